"""Everything a run is built from: checks, the model (LoRA, gradient checkpointing), the
optimizer, the LR schedule, the data stream and the DeepSpeed engine, gathered in a `Run`.

`build(args, dist)` returns the `Run` that train.loop trains and train.checkpoint saves and
restores; the same seed on every rank while building gives identical initial weights everywhere.
"""

from __future__ import annotations

import logging
import math
import random
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pack.errors import PacktrainError
from pack.format import read_manifest
from train.data import PackStream
from train.dist import Dist, log0, on_rank0
from train.hooks import Hooks


# ---------------------------------------------------------------- safety checks

def checksums_wanted(args: Namespace) -> bool:
    """sha256 every shard before training: --verify / --no-verify, else yes for a local dataset
    (a flipped byte can keep every invariant valid; hashing costs ~10% of the invariant scan)
    and no for a URL, whose shards are hashed as they arrive."""
    if args.verify is not None:
        return bool(args.verify)
    return not getattr(args, "shards_url", None)


def preflight_checks(args: Namespace, shards: str, manifest: dict, model: Any,
                     model_path: str, dist: Dist, full_checksums: bool) -> None:
    """train.checks.preflight on rank 0 (the others wait; a refusal stops every rank): shard
    sizes/schemas/rows and pack invariants, checksums (local datasets unless --no-verify), the
    model's tokenizer against the dataset's fingerprint (--allow-tokenizer-mismatch), token ids
    < embedding rows, context length. Warnings are printed."""
    from train.checks import preflight

    notes = on_rank0(dist, lambda: preflight(
        shards, manifest, model, model_path, full_checksums=full_checksums,
        allow_tokenizer_mismatch=bool(args.allow_tokenizer_mismatch)))
    for w in notes or []:
        log0(f"warning: {w}")


# ---------------------------------------------------------------- model, optimizer, schedule

def load_model(args: Namespace, model_path: str, dtype: str,
               ds_config: dict, device: Any = None) -> tuple[Any, Any]:
    """Returns (model, keep_alive). ZeRO-3 builds under HfDeepSpeedConfig so from_pretrained
    partitions parameters at load (keep_alive must outlive the engine). --qlora loads the base
    4-bit on `device` (train.qlora)."""
    from transformers import AutoModelForCausalLM
    from train.config import DTYPES

    keep_alive = None
    if int(ds_config["zero_optimization"]["stage"]) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    from safetensors import SafetensorError

    try:
        if getattr(args, "qlora", False):
            from train.qlora import load_quantized, settings

            # ZeRO-3 (HfDeepSpeedConfig) places parameters itself and refuses a device_map
            where = None if keep_alive is not None else (device or "cpu")
            model, info = load_quantized(model_path, settings(dtype), where,
                                         output_loading_info=True)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=DTYPES[dtype], local_files_only=True,
                trust_remote_code=False, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PacktrainError(f"{model_path}: cannot load a causal LM ({msg}); pass --model PATH "
                             f"to a local Hugging Face model directory") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing and not args.allow_new_weights:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise PacktrainError(f"{model_path}: the checkpoint lacks {len(missing)} weight(s) "
                             f"({', '.join(missing[:3])}{more}), which would start from random "
                             f"values; pass --allow-new-weights if that is meant")
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
        try:
            model = get_peft_model(model, cfg)
        except ValueError as e:  # target modules not found in the model
            msg = " ".join(str(e).split())[:200]
            raise PacktrainError(f"--lora-targets {args.lora_targets}: {msg}; name modules of "
                                 f"this model (e.g. q_proj,v_proj) or all-linear") from None
    return model, keep_alive



def make_optimizer(model: Any, args: Namespace) -> torch.optim.Optimizer:
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
    # The fused kernel (CPU and CUDA): one optimizer step over 70M parameters on CPU took 0.12
    # CPU-s against 0.67 for the default for-loop AdamW, ~25% of a 2k packed step. Failing that
    # (a device or dtype without it), foreach: a few kernels per group, not per parameter.
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kw)


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
    """One run: what build made, and the counters the loop advances and checkpoints record."""

    args: Namespace                # train-run's arguments (train.cli.parse_run_args)
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
    skipped_steps: int = 0         # steps skipped for a non-finite loss (--skip-nonfinite)
    keep_alive: Any = None
    model_path: str = ""
    manifest_sha256: str = ""
    datasets: list = field(default_factory=list)  # a mixture's datasets (train.mixture); [] if one
    hooks: Hooks = field(default_factory=Hooks)  # test/debug hooks (train.hooks): off by default
    eval_set: Any = None           # train.evaluate.EvalSet, or None: no evaluation
    best_eval: dict | None = None  # {"step", "eval_loss"} of the lowest eval loss (--save-best)
    sp: Any = None                 # train.sequence_parallel.SPGroup, or None (N = 1)
    pref: Any = None               # train.preference.Preference (--objective dpo|simpo), or None


def planned_steps(args: Namespace, stream: PackStream) -> int:
    """Optimizer steps of the run: --epochs over the stream, capped by --max-steps."""
    total = stream.steps_for_epochs(args.epochs)
    if args.max_steps is not None and args.max_steps >= 0:
        total = min(total, args.max_steps)
    return total


def build(args: Namespace, dist: Dist, hooks: Hooks | None = None) -> Run:
    """Check the dataset and model, load the model and data, and start the DeepSpeed engine.
    DeepSpeed's own checkpoint loads still unpickle: train.checkpoint.safe_deepspeed_loads makes
    them weights-only before any resume."""
    import deepspeed
    from train.attention import enable_packed_attention, select_backend
    from train.config import DTYPES, build_ds_config, resolve_dtype
    from train.sequence_parallel import enable_ulysses, setup_sequence_parallel, shard_stream

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    manifest = read_manifest(args.shards)
    model_path = args.model or manifest["tokenizer"]["path"]
    if not Path(model_path).is_dir():
        raise PacktrainError(f"{model_path}: no such model directory; pass --model PATH to a "
                             f"local Hugging Face model (default: the dataset's tokenizer path)")
    from train.preference_setup import plan_preference, start_reference

    pref = plan_preference(args, manifest, model_path)
    out = Path(args.output)
    sp = setup_sequence_parallel(args, dist.world_size, dist.rank)
    dtype = resolve_dtype(args.dtype, dist.device)
    ds_config = build_ds_config(args, dtype, dist.device)

    # same seed on every rank while building: identical initial weights (LoRA init) everywhere
    seed_everything(args.seed)
    model, keep_alive = load_model(args, model_path, dtype, ds_config, dist.device)
    if getattr(args, "qlora", False):
        from train.qlora import describe, settings

        log0(describe(model, settings(dtype)))
    backend = select_backend(args.attn, dist.device, DTYPES[dtype])
    enable_packed_attention(model, backend)
    reference = start_reference(pref, args, dist, ds_config, backend, sp)
    if sp is not None:
        backend = enable_ulysses(model, backend, sp)
    log0(f"attention backend: {backend} (--attn {args.attn}, {dist.device.type}, {dtype})")

    preflight_checks(args, args.shards, manifest, model, model_path, dist,
                     checksums_wanted(args))

    from train.mixture import open_stream

    def check_more(path, m, full):  # a mixture's other datasets
        preflight_checks(args, path, m, model, model_path, dist, full)
    data = open_stream(args, manifest, dist, check_more)
    data.stream.reference = reference  # stored reference log-probs, before any SP slicing
    stream = data.stream if sp is None else shard_stream(data.stream, sp)
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
    # from_pretrained returns the model in eval mode, and neither DeepSpeed nor the loop
    # switched it back: dropout (--lora-dropout, the model's own) silently did nothing
    engine.train()
    seed_everything(args.seed + dist.rank)  # dropout etc. differ per rank from here on
    return Run(args=args, dist=dist, engine=engine, model=engine.module, stream=stream,
               manifest=manifest, out=out, total_steps=total, backend=backend, dtype=dtype,
               ds_config=ds_config, keep_alive=keep_alive, model_path=str(model_path),
               manifest_sha256=data.manifest_sha256, datasets=data.datasets,
               hooks=hooks or Hooks(), sp=sp, pref=pref)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
