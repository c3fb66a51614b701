"""The training loop: DeepSpeed engine set-up, the exact-loss step, logging, checkpoint/resume.

Read top to bottom: `setup_distributed` -> `build` (dataset, model, engine) -> `train` (the loop),
with `train_step` (one optimizer step) and `save_checkpoint` / `restore_checkpoint` in between.

Exact loss
----------
Packed training must give the gradient of unpacked training of the same samples:

    grad = d/dθ [ sum of per-token CE over every label token of the optimizer step ] / N

where N counts the label tokens of the whole step (all ranks, all accumulation micro-steps). Per
micro-batch, `packed_loss` returns the summed CE `loss_sum`; we backward

    loss_sum * (grad_accum * world_size) / N

because DeepSpeed 0.19 (a) divides the loss given to `engine.backward` by
gradient_accumulation_steps (`scale_wrt_gas=True`, runtime/engine.py `backward`) and (b) averages
gradients over data-parallel ranks (ZeRO 0: engine `allreduce_bucket` multiplies by
1/dp_world_size; ZeRO 1/2: stage_1_and_2 `average_tensor`/`gradient_reduction_w_predivide`;
ZeRO 3: stage3 `__avg_scatter_contiguous_grads` divides by the averaging world size;
gradient_predivide_factor only moves where the same division happens). The two factors cancel and
the accumulated, reduced gradient is exactly d(sum CE)/N. tests/test_loop.py checks it against
HF's own loss (reduction sum / label tokens) on the same samples unpacked and padded (gradients
agree to ~4e-8), and 2 ranks x ZeRO 0-3 against 1 rank with the same global batch (losses to
~2e-7 over 8 steps).

The forward must go through the engine (`engine(...)`): DeepSpeed 0.19 hooks the engine's forward
outputs to run its backward prologue (ZeRO's accumulation-boundary bookkeeping). `packed_loss`
therefore runs as the forward of the engine's module for one call (`_packed_forward`); the module
handed to DeepSpeed stays the (peft-wrapped) Hugging Face model so checkpoint keys are its
parameter names.

Distributed start-up
--------------------
`train-run` works with no launcher (single process; defaults RANK=0, WORLD_SIZE=1, LOCAL_RANK=0,
MASTER_ADDR=127.0.0.1, MASTER_PORT=a free port), under torchrun / the deepspeed launcher (their
variables are used as they are), and under SLURM `srun` (one task per GPU): when RANK/WORLD_SIZE
are unset, SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID give RANK/WORLD_SIZE/LOCAL_RANK, MASTER_ADDR is
the first host of SLURM_JOB_NODELIST (via `scontrol show hostnames` when available) and
MASTER_PORT defaults to 29500 + SLURM_JOB_ID % 1000 (every task computes the same value; set
MASTER_PORT yourself to override). Backend: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pack.format import PacktrainError, PackedDataset, file_sha256, read_manifest, write_atomic
from train.data import DataState, MicroBatch, PackStream

IGNORE_INDEX = -100
STATE_FILE = "packtrain_state.json"
LATEST = "latest"


def log0(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, flush=True)


# ---------------------------------------------------------------- distributed start-up

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # "node[01-04,07],gpu3" -> "node01"
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    m = re.match(r"^([^\[]+)\[([^\],\-]+)", first)
    return m.group(1) + m.group(2) if m else first


def distributed_env() -> dict[str, str]:
    """The RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT values to use (see module doc)."""
    env = os.environ
    out: dict[str, str] = {}
    if "RANK" not in env or "WORLD_SIZE" not in env:
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            out["RANK"] = env["SLURM_PROCID"]
            out["WORLD_SIZE"] = env["SLURM_NTASKS"]
            out["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
            if "MASTER_ADDR" not in env:
                nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
                out["MASTER_ADDR"] = _first_slurm_host(nodelist)
            if "MASTER_PORT" not in env:
                out["MASTER_PORT"] = str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000)
        else:
            out.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            if "MASTER_ADDR" not in env:
                out["MASTER_ADDR"] = "127.0.0.1"
            if "MASTER_PORT" not in env:
                out["MASTER_PORT"] = str(_free_port())
    elif "LOCAL_RANK" not in env:
        out["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    return out


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    os.environ.update(distributed_env())
    # DeepSpeed 0.19 calls collectives torch 2.13 renamed; one warning per call is noise
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                            category=FutureWarning)
    import deepspeed
    import torch.distributed as tdist

    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not tdist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    return Dist(tdist.get_rank(), tdist.get_world_size(), local_rank, device)


def barrier() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.barrier()


def all_reduce_sum(values: list[float], device: torch.device, dtype=torch.float64) -> list[float]:
    import torch.distributed as tdist

    t = torch.tensor(values, dtype=dtype, device=device)
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t.tolist()


def on_rank0(dist: "Dist", fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only, then synchronise. If it raises, rank 0 re-raises and the other
    ranks raise too, instead of waiting forever in the next collective."""
    result, failed, err = None, 0.0, None
    if dist.is_main:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            failed, err = 1.0, e
    if all_reduce_sum([failed], dist.device)[0] > 0:
        if err is not None:
            raise err
        raise PacktrainError("rank 0 failed (see its error); stopping this rank too")
    return result


# ---------------------------------------------------------------- safety checks

def preflight_checks(args, manifest: dict, model, model_path: str, dist: Dist) -> None:
    """train.checks.preflight on rank 0 (the others wait; a refusal stops every rank): shard
    sizes/schemas/rows and pack invariants, --verify checksums, the model's tokenizer against the
    dataset's fingerprint (--allow-tokenizer-mismatch), token ids < embedding rows, context
    length. Warnings are printed."""
    from train.checks import preflight

    notes = on_rank0(dist, lambda: preflight(
        args.shards, manifest, model, model_path, full_checksums=bool(args.verify),
        allow_tokenizer_mismatch=bool(args.allow_tokenizer_mismatch)))
    for w in notes or []:
        log0(f"warning: {w}")


# ---------------------------------------------------------------- model, optimizer, schedule

def load_model(args, model_path: str, dtype: str, ds_config: dict):
    """Returns (model, keep_alive). ZeRO-3 builds under HfDeepSpeedConfig so from_pretrained
    partitions parameters at load (keep_alive must outlive the engine)."""
    from transformers import AutoModelForCausalLM
    from train.config import DTYPES

    keep_alive = None
    if int(ds_config["zero_optimization"]["stage"]) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=DTYPES[dtype], local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PacktrainError(f"{model_path}: cannot load a causal LM ({msg}); pass --model PATH "
                             f"to a local Hugging Face model directory") from None
    model.config.use_cache = False
    if args.gradient_checkpointing:
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        targets = args.lora_targets
        targets = "all-linear" if targets in (None, "", "all-linear") else [
            t.strip() for t in targets.split(",") if t.strip()]
        cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                         target_modules=targets, task_type="CAUSAL_LM", bias="none")
        model = get_peft_model(model, cfg)
    return model, keep_alive


def lora_config_dict(model) -> dict | None:
    cfg = getattr(model, "peft_config", None)
    if not cfg:
        return None
    d = next(iter(cfg.values())).to_dict()

    def clean(v):
        if isinstance(v, (set, frozenset, tuple)):
            return sorted(clean(x) for x in v) if isinstance(v, (set, frozenset)) else [clean(x) for x in v]
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if hasattr(v, "value") and not isinstance(v, (int, float, str)):  # enums
            return v.value
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        return str(v)
    return clean(d)


def make_optimizer(model, args):
    """AdamW over trainable parameters; no weight decay for biases and norm weights (1-D).
    DeepSpeedCPUAdam (compiled once) when the optimizer state is offloaded."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # ZeRO-3 partitions tensors to shape (0,); ds_shape keeps the real one
        shape = getattr(p, "ds_shape", p.shape)
        (no_decay if len(shape) < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise PacktrainError("the model has no trainable parameters")
    if args.offload != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_factor(step: int, *, lr: float, min_lr: float, warmup: int, total: int,
              schedule: str) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warm-up to --lr over `warmup`
    steps (the first step already uses lr/warmup), then cosine or linear decay to --min-lr at the
    last step, or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or lr <= 0:
        return 1.0
    span = max(1, total - warmup - 1)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    floor = min_lr / lr
    if schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    raise PacktrainError(f"--schedule {schedule!r}: choose cosine, linear or constant")


# ---------------------------------------------------------------- the run

@dataclass
class Run:
    args: Any
    dist: Dist
    engine: Any
    model: Any                     # engine.module: the (peft-wrapped) HF model
    stream: PackStream
    manifest: dict
    out: Path
    total_steps: int
    backend: str
    dtype: str
    ds_config: dict
    step: int = 0                  # optimizer steps done
    tokens_seen: int = 0
    label_tokens_seen: int = 0
    elapsed_before: float = 0.0    # seconds trained before a resume
    keep_alive: Any = None
    model_path: str = ""
    debug_packs: Path | None = None


def planned_steps(args, stream: PackStream) -> int:
    total = args.epochs * stream.steps_per_epoch
    if args.max_steps is not None and args.max_steps >= 0:
        total = min(total, args.max_steps)
    return total


def build(args, dist: Dist) -> Run:
    import deepspeed
    from train.attention import enable_packed_attention, select_backend
    from train.config import DTYPES, build_ds_config, resolve_dtype

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    manifest = read_manifest(args.shards)
    model_path = args.model or manifest["tokenizer"]["path"]
    if not Path(model_path).is_dir():
        raise PacktrainError(f"{model_path}: no such model directory; pass --model PATH to a "
                             f"local Hugging Face model (default: the dataset's tokenizer path)")
    out = Path(args.output)
    dtype = resolve_dtype(args.dtype, dist.device)
    ds_config = build_ds_config(args, dtype, dist.device)

    # same seed on every rank while building: identical initial weights (LoRA init) everywhere
    seed_everything(args.seed)
    model, keep_alive = load_model(args, model_path, dtype, ds_config)
    backend = select_backend(args.attn, dist.device, DTYPES[dtype])
    enable_packed_attention(model, backend)
    log0(f"attention backend: {backend} (--attn {args.attn}, {dist.device.type}, {dtype})")

    preflight_checks(args, manifest, model, model_path, dist)

    stream = PackStream(PackedDataset(args.shards, manifest), seed=args.seed, rank=dist.rank,
                        world_size=dist.world_size, micro_batch=args.micro_batch,
                        grad_accum=args.grad_accum)
    total = planned_steps(args, stream)
    if total <= 0:
        raise PacktrainError("nothing to train: --epochs/--max-steps give 0 optimizer steps")

    optimizer = make_optimizer(model, args)
    sched_kw = dict(lr=args.lr, min_lr=args.min_lr, warmup=args.warmup_steps, total=total,
                    schedule=args.schedule)
    lr_factor(0, **sched_kw)  # validates --schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, **sched_kw))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config)
    seed_everything(args.seed + dist.rank)  # dropout etc. differ per rank from here on
    debug = os.environ.get("PACKTRAIN_DEBUG_PACKS")
    return Run(args=args, dist=dist, engine=engine, model=engine.module, stream=stream,
               manifest=manifest, out=out, total_steps=total, backend=backend, dtype=dtype,
               ds_config=ds_config, keep_alive=keep_alive, model_path=str(model_path),
               debug_packs=Path(debug) if debug else None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def write_run_files(run: Run) -> None:
    """run.json and model_config/ (rank 0, at start)."""
    from train.tiny import copy_tokenizer_files

    out = run.out
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    try:
        from importlib.metadata import version
        pt_version = version("packtrain")
    except Exception:
        pt_version = "unknown"
    info = {
        "packtrain_version": pt_version,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(run.args).items()},
        "model_path": str(Path(run.model_path).resolve()),
        "shards": str(Path(run.args.shards).resolve()),
        "manifest_sha256": file_sha256(Path(run.args.shards) / "manifest.json"),
        "tokenizer_fingerprint": run.manifest["tokenizer"].get("fingerprint"),
        "world_size": run.dist.world_size,
        "dtype": run.dtype,
        "attention": run.backend,
        "total_steps": run.total_steps,
        "steps_per_epoch": run.stream.steps_per_epoch,
        "global_batch_packs": run.stream.global_batch_packs,
        "deepspeed_config": run.ds_config,
        "lora": bool(run.args.lora),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_atomic(out / "run.json", (json.dumps(info, indent=2, default=str) + "\n").encode())
    mc = out / "model_config"
    mc.mkdir(parents=True, exist_ok=True)
    from train.attention import unwrap_model

    base = unwrap_model(run.model)
    cfg = base.config
    cfg.save_pretrained(str(mc))
    # the exported model should not name our training-only attention backend
    cfg_path = mc / "config.json"
    d = json.loads(cfg_path.read_text())
    if str(d.get("_attn_implementation", "")).startswith("packtrain_"):
        d.pop("_attn_implementation")
    write_atomic(cfg_path, (json.dumps(d, indent=2, sort_keys=True) + "\n").encode())
    gen = getattr(base, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(str(mc))
        except Exception:  # an invalid generation config must not stop training
            pass
    src = run.model_path
    if not any((Path(src) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        src = run.manifest["tokenizer"]["path"]
    copy_tokenizer_files(src, mc)
    lora = lora_config_dict(run.model)
    if lora is not None:
        write_atomic(mc / "lora.json", (json.dumps(lora, indent=2, sort_keys=True) + "\n").encode())


# ---------------------------------------------------------------- the step

@contextlib.contextmanager
def _packed_forward(model, fn: Callable):
    """Make `fn` the forward of `model` for one engine call (module hooks still run)."""
    had = "forward" in model.__dict__
    old = model.__dict__.get("forward")
    model.forward = fn
    try:
        yield
    finally:
        if had:
            model.forward = old
        else:
            del model.forward


def micro_loss(engine, mb: MicroBatch, chunk_size: int):
    """(loss_sum tensor, n_label_tokens) of one packed row, computed inside engine(...)."""
    from train.loss import packed_loss

    model = engine.module

    def forward():
        return packed_loss(model, mb.input_ids, mb.labels, mb.position_ids, mb.cu_seqlens,
                           chunk_size, max_length=mb.max_seqlen)

    with _packed_forward(model, forward):
        return engine()


@dataclass
class StepResult:
    loss: float
    label_tokens: int
    tokens: int
    grad_norm: float | None
    lr: float


def _local_grad_norm(engine) -> float | None:
    """ZeRO-0 fp32 does not record the norm: compute it from .grad (full on every rank), before
    clipping, as the ZeRO optimizers report it."""
    # accumulate in float64: an fp32 norm over millions of elements is off by ~1e-5
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64)
             for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None


def train_step(run: Run, micro_batches: list[MicroBatch],
               before_update: Callable[[Any], None] | None = None) -> StepResult:
    """One optimizer step over this rank's `grad_accum` micro-batches (see the module doc for
    the loss scaling). `before_update(engine)` runs after the last backward, before the update
    (tests read gradients there)."""
    engine, dist = run.engine, run.dist
    ga = engine.gradient_accumulation_steps()
    if len(micro_batches) != ga:
        raise RuntimeError(f"{len(micro_batches)} micro-batches for gradient_accumulation_steps {ga}")
    local_labels = sum(mb.num_label_tokens for mb in micro_batches)
    local_tokens = sum(mb.num_tokens for mb in micro_batches)
    n_total, tokens_total = all_reduce_sum([local_labels, local_tokens], dist.device)
    n_total, tokens_total = int(n_total), int(tokens_total)
    scale = ga * dist.world_size / max(n_total, 1)
    lr = float(engine.optimizer.param_groups[0]["lr"]) if hasattr(engine.optimizer, "param_groups") \
        else float(engine.get_lr()[0])
    loss_sum_local = torch.zeros((), dtype=torch.float64, device=dist.device)
    grad_norm = None
    zero0_fp32 = engine.zero_optimization_stage() == 0 and run.dtype == "fp32"
    for i, mb in enumerate(micro_batches):
        mb = mb.to(dist.device)
        loss_sum, n = micro_loss(engine, mb, run.args.loss_chunk)
        if n != mb.num_label_tokens:
            raise RuntimeError(f"packed_loss counted {n} label tokens, the data {mb.num_label_tokens}")
        engine.backward(loss_sum * scale)
        loss_sum_local += loss_sum.detach().double()
        if i == len(micro_batches) - 1:
            if before_update is not None:
                before_update(engine)
            if zero0_fp32:
                grad_norm = _local_grad_norm(engine)
        engine.step()
    loss_sum_total = all_reduce_sum([float(loss_sum_local)], dist.device)[0]
    if not zero0_fp32:
        gn = engine.get_global_grad_norm()
        grad_norm = None if gn is None else float(gn)
    return StepResult(loss=loss_sum_total / max(n_total, 1), label_tokens=n_total,
                      tokens=tokens_total, grad_norm=grad_norm, lr=lr)


# ---------------------------------------------------------------- checkpoints

def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def _rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(),
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(run: Run, data_state: DataState, epoch: int, elapsed: float) -> Path:
    """All ranks save (DeepSpeed is collective) and their RNG states; after a barrier rank 0
    writes packtrain_state.json, then (after a barrier) `latest`, atomically: a checkpoint counts
    only once `latest` names it."""
    ckpt_root = run.out / "checkpoints"
    tag = tag_for(run.step)
    state = {"step": run.step, "epoch": epoch, "data": data_state.to_dict(),
             "world_size": run.dist.world_size, "seed": run.args.seed,
             "micro_batch": run.args.micro_batch, "grad_accum": run.args.grad_accum,
             "tokens_seen": run.tokens_seen, "label_tokens_seen": run.label_tokens_seen,
             "elapsed_s": elapsed, "total_steps": run.total_steps}
    run.engine.save_checkpoint(str(ckpt_root), tag=tag, client_state={"packtrain": state},
                               save_latest=False)
    torch.save(_rng_state(), ckpt_root / tag / f"rng_state_{run.dist.rank}.pth")
    barrier()  # every rank has saved
    on_rank0(run.dist, lambda: write_atomic(ckpt_root / tag / STATE_FILE,
                                            (json.dumps(state, indent=2) + "\n").encode()))
    on_rank0(run.dist, lambda: write_atomic(ckpt_root / LATEST, (tag + "\n").encode()))
    return ckpt_root / tag


def find_resume(arg: str | None, out: Path) -> Path | None:
    """--resume auto: OUTPUT/checkpoints/latest if present, else None (fresh start).
    --resume PATH: a step directory, a checkpoints directory or a run OUTPUT directory."""
    if not arg:
        return None
    if arg == "auto":
        latest = out / "checkpoints" / LATEST
        if not latest.is_file():
            return None
        return out / "checkpoints" / latest.read_text().strip()
    p = Path(arg)
    for cand in (p, p / "checkpoints"):
        if (cand / LATEST).is_file():
            return cand / (cand / LATEST).read_text().strip()
    if (p / STATE_FILE).is_file():
        return p
    raise PacktrainError(f"--resume {arg}: no complete checkpoint there (expected a step directory "
                         f"with {STATE_FILE}, or a directory with a '{LATEST}' file)")


def restore_checkpoint(run: Run, path: Path) -> DataState:
    """Model, optimizer and scheduler via DeepSpeed; data position, counters and RNG states."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise PacktrainError(f"{path}: incomplete checkpoint ({STATE_FILE} missing)")
    state = json.loads(state_file.read_text())
    load_path, _ = run.engine.load_checkpoint(str(path.parent), tag=path.name,
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is None:
        raise PacktrainError(f"{path}: DeepSpeed could not load this checkpoint")
    run.step = int(state["step"])
    run.tokens_seen = int(state.get("tokens_seen", 0))
    run.label_tokens_seen = int(state.get("label_tokens_seen", 0))
    run.elapsed_before = float(state.get("elapsed_s", 0.0))
    if int(state["seed"]) != run.args.seed:
        log0(f"warning: checkpoint seed {state['seed']} != --seed {run.args.seed}; the data "
             f"order follows --seed from here on")
    rng = path / f"rng_state_{run.dist.rank}.pth"
    if rng.is_file() and int(state["world_size"]) == run.dist.world_size:
        _set_rng_state(torch.load(rng, weights_only=False))
    else:
        log0("warning: world size changed since the checkpoint; RNG states re-seeded")
    return DataState.from_dict(state["data"])


# ---------------------------------------------------------------- the loop

def _trim_metrics(path: Path, upto_step: int) -> None:
    """After a resume, drop lines of steps the checkpoint does not include."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= upto_step:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError, ValueError):
            continue
    write_atomic(path, ("\n".join(keep) + ("\n" if keep else "")).encode())


def train(args) -> dict:
    """Run training as configured by train-run's arguments; returns the closing summary."""
    from tqdm import tqdm

    dist = setup_distributed()
    out = Path(args.output)
    resume_from = find_resume(args.resume, out)
    if resume_from is None and (out / "checkpoints" / LATEST).is_file():
        raise PacktrainError(f"{out} already holds a run with checkpoints; pass --resume auto to "
                             f"continue it, or choose another --output")
    run = build(args, dist)
    on_rank0(dist, lambda: write_run_files(run))
    metrics_path = out / "metrics.jsonl"
    if resume_from is not None:
        run.stream.state = restore_checkpoint(run, resume_from)
        log0(f"resumed from {resume_from} at step {run.step}")
        on_rank0(dist, lambda: _trim_metrics(metrics_path, run.step))
    else:
        on_rank0(dist, lambda: metrics_path.unlink(missing_ok=True))
    if run.debug_packs is not None:
        run.debug_packs.mkdir(parents=True, exist_ok=True)

    log0(f"training {run.total_steps} steps: {len(run.stream.ds)} packs, "
         f"{run.stream.global_batch_packs} packs/step ({dist.world_size} rank(s) x "
         f"{args.grad_accum} accumulation x {args.micro_batch} packs/micro-batch), "
         f"{run.stream.steps_per_epoch} steps/epoch, ZeRO {args.zero}, {run.dtype}")
    # a live bar on a terminal; plain "step N/M ..." lines every --log-every steps otherwise
    interactive = sys.stderr.isatty()
    bar = tqdm(total=run.total_steps, initial=run.step, disable=not (dist.is_main and interactive),
               desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
    t_start = time.perf_counter()
    steps_at_start = run.step
    last = None
    epoch = run.stream.state.epoch
    saved_at = run.step if resume_from is not None else -1
    metrics = open(metrics_path, "a") if dist.is_main else None
    try:
        while run.step < run.total_steps:
            t0 = time.perf_counter()
            micro_batches, epoch = run.stream.next_step()
            res = train_step(run, micro_batches)
            dt = time.perf_counter() - t0
            run.step += 1
            run.tokens_seen += res.tokens
            run.label_tokens_seen += res.label_tokens
            elapsed = run.elapsed_before + time.perf_counter() - t_start
            last = {"step": run.step, "epoch": epoch, "loss": res.loss, "lr": res.lr,
                    "grad_norm": res.grad_norm, "tokens": res.tokens,
                    "label_tokens": res.label_tokens, "tokens_per_s": res.tokens / dt,
                    "elapsed_s": round(elapsed, 3)}
            if run.debug_packs is not None:
                with open(run.debug_packs / f"packs-rank{dist.rank}.jsonl", "a") as f:
                    f.write(json.dumps({"step": run.step, "epoch": epoch, "rank": dist.rank,
                                        "micro": [mb.pack_ids for mb in micro_batches]}) + "\n")
            if metrics is not None:
                metrics.write(json.dumps(last) + "\n")
                metrics.flush()
                bar.update(1)
                if run.step % args.log_every == 0 or run.step == run.total_steps:
                    bar.set_postfix(loss=f"{res.loss:.4f}", lr=f"{res.lr:.2e}",
                                    tok_s=f"{res.tokens / dt:,.0f}", refresh=False)
                    if not interactive:
                        left = (run.total_steps - run.step) * (time.perf_counter() - t_start) \
                            / max(1, run.step - steps_at_start)
                        print(f"step {run.step}/{run.total_steps} loss {res.loss:.4f} "
                              f"lr {res.lr:.3e} tokens/s {res.tokens / dt:,.0f} "
                              f"eta {left:.0f}s", file=sys.stderr, flush=True)
            if args.save_every and run.step % args.save_every == 0 and run.step < run.total_steps:
                save_checkpoint(run, run.stream.state, epoch, elapsed)
                saved_at = run.step
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    elapsed = run.elapsed_before + time.perf_counter() - t_start
    if saved_at != run.step:
        save_checkpoint(run, run.stream.state, epoch, elapsed)
    tag = tag_for(run.step)
    summary = {"steps": run.step, "tokens": run.tokens_seen, "label_tokens": run.label_tokens_seen,
               "elapsed_s": round(elapsed, 2),
               "tokens_per_s": run.tokens_seen / elapsed if elapsed > 0 else None,
               "final_loss": last["loss"] if last else None,
               "checkpoint": str(out / "checkpoints" / tag)}
    # Release the engine and the ZeRO-3 config: with HfDeepSpeedConfig alive, a model built by
    # the export would be partitioned with collectives that only rank 0 enters (a hang).
    run.engine = run.model = run.keep_alive = None
    _unset_hf_deepspeed_config()
    if args.export:
        summary["export"] = on_rank0(
            dist, lambda: _export(out / "checkpoints" / tag, out / "export"))
    if dist.is_main:
        loss = f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "n/a"
        tps = f"{summary['tokens_per_s']:,.0f}" if summary["tokens_per_s"] else "n/a"
        print(f"done: {run.step} steps, {run.tokens_seen:,} tokens ({run.label_tokens_seen:,} "
              f"label tokens) in {elapsed:.1f}s, {tps} tokens/s, final loss {loss}; "
              f"checkpoint {summary['checkpoint']}"
              + (f"; export {summary['export']}" if summary.get("export") else ""), flush=True)
    return summary


def _unset_hf_deepspeed_config() -> None:
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    except ImportError:  # pragma: no cover
        return
    unset_hf_deepspeed_config()


def _export(checkpoint: Path, out_dir: Path) -> str | None:
    if importlib.util.find_spec("train.export") is None:
        print("note: train.export is not available; skipping --export", flush=True)
        return None
    from train.export import export_checkpoint

    return str(export_checkpoint(checkpoint, out_dir, merge=False))
