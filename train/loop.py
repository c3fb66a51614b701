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
MASTER_PORT yourself to override). Backend: gloo on CPU, nccl on CUDA. Every collective has a
timeout of --dist-timeout seconds (default 1800), so a rank whose peer died or hangs fails instead
of waiting forever, even with no launcher watching.

Faults and interruptions
------------------------
* Checkpoints are complete or ignored: `latest` is written last and only names a step directory
  whose every file is written and fsynced; --resume auto follows it, so a step directory left
  half-written by a crash is skipped, and is deleted before the same step is saved again.
* SIGTERM (SLURM / Kubernetes preemption; torchrun forwards it to every rank) sets a flag; at the
  next step boundary the ranks agree on it (one all-reduce), write a checkpoint and raise
  `Preempted` (train-run exits with PREEMPTED_EXIT = 75 after one line on stderr); rank 0 also
  writes OUTPUT/preempted.json. A second SIGTERM kills at once. Bound: the rest of the current step
  plus one checkpoint.
* Under torchrun's elastic agent (train-run --nproc, torchrun) each rank watches its parent: if
  the agent is killed (SIGKILL gives it no chance to stop its workers, which run in their own
  sessions) the rank exits within a second instead of training on as an orphan.
* Nothing is unpickled: RNG states are JSON, and DeepSpeed's own loads (which use
  torch.load(weights_only=False)) are redirected to train.export.safe_load (weights only, a short
  allowlist of DeepSpeed classes).
* Test-only fault points (off unless PACKTRAIN_FAULTPOINT is set; comma-separated):
  `kill-after-step:N[@R]` SIGKILLs rank R (default 0) after optimizer step N, before any
  checkpoint of it; `kill-in-ckpt:N[@R]` after DeepSpeed wrote step N's files, before our state
  file and `latest`; `stop-after-step:N[@R]` SIGSTOPs it (a hung rank); `step-sleep:S` sleeps S
  seconds before every step (a window for tests to send signals mid-run).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from datetime import timedelta
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pack.errors import PacktrainError
from pack.files import file_sha256, write_atomic
from pack.format import read_manifest
from train.data import DataState, MicroBatch, PackStream

IGNORE_INDEX = -100
STATE_FILE = "packtrain_state.json"
LATEST = "latest"
PREEMPTED_FILE = "preempted.json"
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on purpose with a checkpoint; rerun with --resume auto
DEFAULT_DIST_TIMEOUT = 1800
FAULTPOINT_ENV = "PACKTRAIN_FAULTPOINT"


class Preempted(Exception):
    """Training stopped on SIGTERM after writing the checkpoint `checkpoint` at `step`."""

    def __init__(self, step: int, checkpoint: Path, signame: str = "SIGTERM"):
        super().__init__(f"preempted: {signame} received; stopped after step {step} with checkpoint "
                         f"{checkpoint}; continue with --resume auto (exit code {PREEMPTED_EXIT})")
        self.step, self.checkpoint = step, checkpoint


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


def setup_distributed(timeout_s: float = DEFAULT_DIST_TIMEOUT) -> Dist:
    """Initialise the process group; every collective then fails after `timeout_s` seconds
    without its peers instead of hanging."""
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
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    return Dist(tdist.get_rank(), tdist.get_world_size(), local_rank, device)


def close_distributed_at_exit() -> None:
    """After a finished run: destroy the process group when the interpreter exits (atexit, so
    that several runs in one process share the group). Left to exit-time destructors, a rank
    once aborted after a complete ZeRO-2 run and its export (SIGABRT, "terminate called without
    an active exception": a communication thread torn down while still joinable), which turned
    a finished run into a failed launch. Only after success: a rank that fails exits without
    waiting on peers that may be stuck in a collective."""
    import atexit

    atexit.unregister(_close_distributed)  # registered once, however many runs finish
    atexit.register(_close_distributed)


def _close_distributed() -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


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


# ---------------------------------------------------------------- faults and signals

def _faultpoints() -> list[tuple[str, float, int | None]]:
    """Parse PACKTRAIN_FAULTPOINT (see the module doc) into (name, value, rank or None)."""
    spec = os.environ.get(FAULTPOINT_ENV, "").strip()
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        m = re.fullmatch(r"(kill-after-step|kill-in-ckpt|stop-after-step|step-sleep):"
                         r"([0-9.]+)(?:@(\d+))?", item)
        if not m:
            raise PacktrainError(f"{FAULTPOINT_ENV}={spec!r}: cannot parse {item!r}; expected "
                                 f"kill-after-step:N[@R], kill-in-ckpt:N[@R], stop-after-step:N[@R] "
                                 f"or step-sleep:SECONDS (a test-only setting: unset it)")
        out.append((m.group(1), float(m.group(2)), None if m.group(3) is None else int(m.group(3))))
    return out


def faultpoint(name: str, step: int, rank: int) -> None:
    """Test-only: act on a matching PACKTRAIN_FAULTPOINT entry (nothing when it is unset)."""
    if FAULTPOINT_ENV not in os.environ:
        return
    for fname, value, frank in _faultpoints():
        if fname != name or int(value) != step or (frank if frank is not None else 0) != rank:
            continue
        print(f"faultpoint {name}:{step} rank {rank} pid {os.getpid()}", file=sys.stderr,
              flush=True)
        os.kill(os.getpid(), signal.SIGSTOP if name.startswith("stop") else signal.SIGKILL)


def _step_sleep() -> float:
    if FAULTPOINT_ENV not in os.environ:
        return 0.0
    return sum(v for name, v, _ in _faultpoints() if name == "step-sleep")


class StopRequest:
    """SIGTERM handler for one rank: the first signal sets `requested` (acted on at the next step
    boundary, see train), a second one terminates at once. Restores the old handler on exit."""

    def __init__(self) -> None:
        self.requested = False
        self.signame = "SIGTERM"
        self._old: Any = None

    def _handler(self, signum, frame) -> None:
        if self.requested:  # the user (or the scheduler) insists
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = True
        self.signame = signal.Signals(signum).name
        print(f"rank {os.environ.get('RANK', '0')}: {self.signame} received; writing a checkpoint "
              f"at the end of this step", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)
        return self

    def release(self) -> None:
        """Back to the previous handler (after the last checkpoint nothing is left to save)."""
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None

    def __exit__(self, *exc) -> None:
        self.release()


_watchdog_started = False


def watch_launcher() -> None:
    """Under torchrun's elastic agent, exit if the agent dies: its workers run in their own
    sessions, so a SIGKILLed agent would otherwise leave them training (or hanging) as orphans."""
    global _watchdog_started
    if _watchdog_started or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()
    if parent == 1:
        return

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                print(f"error (rank {os.environ.get('RANK', '?')}): the launcher (pid {parent}) "
                      f"is gone; stopping this rank", file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="packtrain-launcher-watchdog", daemon=True).start()
    _watchdog_started = True


# ---------------------------------------------------------------- safety checks

def checksums_wanted(args) -> bool:
    """sha256 every shard before training: --verify / --no-verify, else yes for a local dataset
    (a flipped byte can keep every invariant valid; hashing costs ~10% of the invariant scan)
    and no for a URL, whose shards are hashed as they arrive."""
    if args.verify is not None:
        return bool(args.verify)
    return not getattr(args, "shards_url", None)


def preflight_checks(args, manifest: dict, model, model_path: str, dist: Dist) -> None:
    """train.checks.preflight on rank 0 (the others wait; a refusal stops every rank): shard
    sizes/schemas/rows and pack invariants, checksums (local datasets unless --no-verify), the model's tokenizer against the
    dataset's fingerprint (--allow-tokenizer-mismatch), token ids < embedding rows, context
    length. Warnings are printed."""
    from train.checks import preflight

    notes = on_rank0(dist, lambda: preflight(
        args.shards, manifest, model, model_path, full_checksums=checksums_wanted(args),
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
    kw = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    try:
        # The fused kernel (CPU and CUDA): one optimizer step over 70M parameters on CPU took
        # 0.12 CPU-s against 0.67 for the default for-loop AdamW, ~25% of a 2k packed step.
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, **kw)


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
    manifest_sha256: str = ""


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

    from pack.remote import open_dataset  # a cache view of a URL fetches shards on first use

    stream = PackStream(open_dataset(args.shards, manifest), seed=args.seed, rank=dist.rank,
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
    safe_deepspeed_loads(engine)
    seed_everything(args.seed + dist.rank)  # dropout etc. differ per rank from here on
    debug = os.environ.get("PACKTRAIN_DEBUG_PACKS")
    return Run(args=args, dist=dist, engine=engine, model=engine.module, stream=stream,
               manifest=manifest, out=out, total_steps=total, backend=backend, dtype=dtype,
               ds_config=ds_config, keep_alive=keep_alive, model_path=str(model_path),
               debug_packs=Path(debug) if debug else None,
               manifest_sha256=file_sha256(Path(args.shards) / "manifest.json"))


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
        "manifest_sha256": run.manifest_sha256,
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


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.json"


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state_json() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as plain JSON: nothing to unpickle on resume."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": [version, list(internal), gauss],
          "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
          "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        st["cuda"] = [_b64(t) for t in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state_json(st: dict) -> None:
    version, internal, gauss = st["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss),
                         float(cached)))
    torch.set_rng_state(_unb64(st["torch"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(x) for x in st["cuda"]])


def safe_deepspeed_loads(engine) -> None:
    """DeepSpeed 0.19's TorchCheckpointEngine.load calls torch.load(weights_only=False), i.e. it
    unpickles arbitrary objects from checkpoint files; every model/optimizer load of
    engine.load_checkpoint goes through engine.checkpoint_engine.load, so point it at the
    weights-only loader export uses (a file holding anything else is refused, naming it)."""
    from train.export import safe_load

    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or not hasattr(ce, "load"):
        raise RuntimeError("DeepSpeed engine has no checkpoint_engine.load; cannot make checkpoint "
                           "loading pickle-free with this DeepSpeed version")

    def load(path, map_location=None):
        # only a device can be honoured without unpickling; DeepSpeed's callables keep storages
        # where they are, i.e. on CPU here, and load_state_dict copies to the device
        loc = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
        return safe_load(path, map_location=loc)

    ce.load = load


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:  # another rank's temporary file may be renamed under us: it fsyncs its own
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _current_latest(ckpt_root: Path) -> str | None:
    f = ckpt_root / LATEST
    return f.read_text().strip() if f.is_file() else None


def save_checkpoint(run: Run, data_state: DataState, epoch: int, elapsed: float) -> Path:
    """All ranks save (DeepSpeed is collective) and their RNG states and fsync what they see;
    after a barrier rank 0 writes packtrain_state.json, then (after a barrier) `latest`,
    atomically: a checkpoint counts only once `latest` names it. A directory of the same tag left
    by a killed earlier attempt is removed first, so no stale file of it survives."""
    ckpt_root = run.out / "checkpoints"
    tag = tag_for(run.step)

    def clear_stale() -> None:
        if (ckpt_root / tag).exists() and _current_latest(ckpt_root) != tag:
            shutil.rmtree(ckpt_root / tag)
    on_rank0(run.dist, clear_stale)
    state = {"step": run.step, "epoch": epoch, "data": data_state.to_dict(),
             "world_size": run.dist.world_size, "seed": run.args.seed,
             "micro_batch": run.args.micro_batch, "grad_accum": run.args.grad_accum,
             "tokens_seen": run.tokens_seen, "label_tokens_seen": run.label_tokens_seen,
             "elapsed_s": elapsed, "total_steps": run.total_steps, "identity": run_identity(run)}
    run.engine.save_checkpoint(str(ckpt_root), tag=tag, client_state={"packtrain": state},
                               save_latest=False)
    faultpoint("kill-in-ckpt", run.step, run.dist.rank)
    write_atomic(ckpt_root / tag / rng_file(run.dist.rank),
                 (json.dumps(rng_state_json()) + "\n").encode())
    _fsync_tree(ckpt_root / tag)  # `latest` must never name data still in the page cache
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


# Model config keys that say nothing about the weights' shapes or meaning.
_VOLATILE_CONFIG = {"_attn_implementation", "_attn_implementation_internal", "_name_or_path",
                    "transformers_version", "torch_dtype", "dtype", "use_cache", "_commit_hash"}


def run_identity(run: Run) -> dict:
    """What a checkpoint must share with the run that resumes it: the model (its config), the
    dataset (manifest hash, tokenizer fingerprint) and the arguments that shape the weights and
    optimizer state (LoRA, ZeRO stage)."""
    from train.attention import unwrap_model

    cfg = {k: v for k, v in unwrap_model(run.model).config.to_dict().items()
           if k not in _VOLATILE_CONFIG}
    a = run.args
    return {
        "model_config_sha256": hashlib.sha256(
            json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest(),
        "manifest_sha256": run.manifest_sha256,
        "tokenizer_fingerprint": run.manifest["tokenizer"].get("fingerprint"),
        "lora": ({"r": a.lora_r, "alpha": a.lora_alpha, "targets": a.lora_targets}
                 if a.lora else None),
        "zero": a.zero,
    }


def check_resume_target(resume_from: Path, out: Path) -> None:
    """A resume writes only into the run it resumes, or into a new, empty --output: never into
    another run, whose checkpoints and metrics it would overwrite and mix."""
    if out.exists() and not out.is_dir():
        raise PacktrainError(f"--output {out}: exists and is not a directory; choose another path")
    same_run = resume_from.resolve().parent == (out / "checkpoints").resolve()
    if same_run or not out.exists() or not any(out.iterdir()):
        return
    raise PacktrainError(f"--output {out} holds another run, and --resume {resume_from} belongs to "
                         f"a different one; resume it into its own run directory or into a new, "
                         f"empty --output")


def check_identity(run: Run, path: Path, saved: dict | None) -> bool:
    """Refuse a checkpoint of another model or of other LoRA/ZeRO settings in one line; a
    different dataset only with --allow-dataset-change. Returns True when the dataset changed
    (its data position then means nothing here). Checkpoints older than this check carry no
    identity and are taken as they are."""
    if not saved:
        return False
    now = run_identity(run)
    what = {"model_config_sha256": "another model (its config differs)",
            "lora": "other LoRA settings", "zero": "another ZeRO stage"}
    for key, text in what.items():
        if key in saved and saved[key] != now[key]:
            raise PacktrainError(f"--resume {path}: the checkpoint is of {text} than this run "
                                 f"({saved[key]} vs {now[key]}); resume with the arguments and "
                                 f"model it was trained with")
    if saved.get("tokenizer_fingerprint") != now["tokenizer_fingerprint"]:
        raise PacktrainError(f"--resume {path}: the checkpoint was trained on a dataset of another "
                             f"tokenizer; its token ids mean something else here")
    changed = saved.get("manifest_sha256") != now["manifest_sha256"]
    if changed and not run.args.allow_dataset_change:
        raise PacktrainError(f"--resume {path}: the checkpoint was trained on another dataset "
                             f"(manifest sha256 differs); pass --allow-dataset-change to continue "
                             f"on this one from its start")
    return changed


def restore_checkpoint(run: Run, path: Path) -> DataState:
    """Model, optimizer and scheduler via DeepSpeed; data position, counters and RNG states."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise PacktrainError(f"{path}: incomplete checkpoint ({STATE_FILE} missing)")
    state = json.loads(state_file.read_text())
    new_data = check_identity(run, path, state.get("identity"))
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
    rng = path / rng_file(run.dist.rank)
    if rng.is_file() and int(state["world_size"]) == run.dist.world_size:
        try:
            set_rng_state_json(json.loads(rng.read_text()))
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise PacktrainError(f"{rng}: not a valid RNG state ({e}); the checkpoint is "
                                 f"corrupt — resume from an older step directory") from None
    elif int(state["world_size"]) == run.dist.world_size:
        log0(f"warning: {rng.name} missing (a checkpoint written before RNG states were JSON?); "
             f"RNG states re-seeded")
    else:
        log0("warning: world size changed since the checkpoint; RNG states re-seeded")
    if new_data:
        log0("note: another dataset than the checkpoint's (--allow-dataset-change): the data "
             "stream starts at its beginning")
        return DataState()
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

    dist = setup_distributed(float(getattr(args, "dist_timeout", DEFAULT_DIST_TIMEOUT)))
    watch_launcher()
    _faultpoints()  # a malformed test setting fails here, before any work
    out = Path(args.output)
    resume_from = find_resume(args.resume, out)
    if resume_from is not None:
        check_resume_target(resume_from, out)
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
    on_rank0(dist, lambda: (out / PREEMPTED_FILE).unlink(missing_ok=True))
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
    stop = StopRequest().__enter__()
    sleep_s = _step_sleep()
    try:
        while run.step < run.total_steps:
            if sleep_s:
                time.sleep(sleep_s)
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
            faultpoint("kill-after-step", run.step, dist.rank)
            faultpoint("stop-after-step", run.step, dist.rank)
            # every rank must take the same branch: agree on "any rank was signalled"
            if all_reduce_sum([float(stop.requested)], dist.device)[0] > 0:
                if saved_at != run.step:
                    save_checkpoint(run, run.stream.state, epoch, elapsed)
                    saved_at = run.step
                _preempted(run, stop.signame)
            if args.save_every and run.step % args.save_every == 0 and run.step < run.total_steps:
                save_checkpoint(run, run.stream.state, epoch, elapsed)
                saved_at = run.step
        elapsed = run.elapsed_before + time.perf_counter() - t_start
        if saved_at != run.step:
            save_checkpoint(run, run.stream.state, epoch, elapsed)
        # a signal that came during the final checkpoint: it is complete, skip the export
        if all_reduce_sum([float(stop.requested)], dist.device)[0] > 0:
            _preempted(run, stop.signame)
    finally:
        stop.release()  # from here a SIGTERM terminates at once: the checkpoint is complete
        bar.close()
        if metrics is not None:
            metrics.close()
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


def _preempted(run: Run, signame: str) -> None:
    """Record the stop (OUTPUT/preempted.json, rank 0) and raise Preempted on every rank."""
    ckpt = run.out / "checkpoints" / tag_for(run.step)
    info = {"step": run.step, "checkpoint": str(ckpt), "signal": signame,
            "exit_code": PREEMPTED_EXIT, "launch_id": os.environ.get("PACKTRAIN_LAUNCH_ID"),
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    on_rank0(run.dist, lambda: write_atomic(run.out / PREEMPTED_FILE,
                                            (json.dumps(info, indent=2) + "\n").encode()))
    raise Preempted(run.step, ckpt, signame)


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
