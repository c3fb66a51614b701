"""DeepSpeed configuration generated from train-run's arguments.

``build_ds_config(args, dtype)`` returns the dict given to ``deepspeed.initialize``:

* ``train_micro_batch_size_per_gpu = 1``: one micro-batch is one packed row (``--micro-batch``
  packs concatenated), never a stack of rows.
* ``gradient_accumulation_steps = --grad-accum``; ``gradient_clipping = --grad-clip``.
* precision: ``bf16`` / ``fp16`` (dynamic loss scaling) / fp32 (neither).
* ``zero_optimization.stage = --zero``; ``--offload optimizer`` (ZeRO >= 1) moves optimizer state
  to CPU, ``--offload param`` (ZeRO-3 only) parameters as well.

``--deepspeed FILE.json`` is deep-merged over the result (its values win). Values ``"auto"``
(Hugging Face style configs) are ignored so ours stand. The merged config must keep
train_micro_batch_size_per_gpu == 1 and gradient_accumulation_steps == --grad-accum (the exact
loss normalisation and the data stream rely on them): set those through the flags.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from pack.errors import PacktrainError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(requested: str, device: torch.device) -> str:
    """--dtype auto: bf16 on GPUs that support it, fp32 otherwise (CPU, or GPUs without bf16;
    pass --dtype fp16 explicitly for those)."""
    if requested != "auto":
        if requested not in DTYPES:
            raise PacktrainError(f"--dtype {requested!r}: choose auto, bf16, fp16 or fp32")
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v == "auto":
            continue
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_user_config(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise PacktrainError(f"{p}: --deepspeed config file not found")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PacktrainError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise PacktrainError(f"{p}: a DeepSpeed config must be a JSON object")
    return cfg


def build_ds_config(args: Any, dtype: str, device: torch.device) -> dict:
    zero = int(args.zero)
    if zero not in (0, 1, 2, 3):
        raise PacktrainError(f"--zero {zero}: choose 0, 1, 2 or 3")
    if args.offload == "param" and zero != 3:
        raise PacktrainError("--offload param needs --zero 3")
    if args.offload == "optimizer" and zero == 0:
        raise PacktrainError("--offload optimizer needs --zero 1, 2 or 3")
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": int(args.grad_accum),
        "gradient_clipping": float(args.grad_clip),
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": zero},
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                       "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    zo = cfg["zero_optimization"]
    if zero >= 1:
        zo.update({"overlap_comm": device.type == "cuda", "contiguous_gradients": True,
                   "reduce_bucket_size": 5e7})
    if zero >= 2:
        zo["allgather_bucket_size"] = 5e7
    if zero == 3:
        zo.update({"stage3_param_persistence_threshold": 1e5,
                   "stage3_prefetch_bucket_size": 5e7,
                   "stage3_max_live_parameters": 1e9,
                   "stage3_gather_16bit_weights_on_model_save": False})
    pin = device.type == "cuda"
    if args.offload in ("optimizer", "param"):
        zo["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if args.offload == "param":
        zo["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if getattr(args, "deepspeed", None):
        cfg = deep_merge(cfg, load_user_config(args.deepspeed))
        where = f"{args.deepspeed}"
        if int(cfg.get("train_micro_batch_size_per_gpu", 1)) != 1:
            raise PacktrainError(f"{where}: train_micro_batch_size_per_gpu must be 1 (a micro-batch "
                                 f"is one packed row); use --micro-batch to put more packs in it")
        if int(cfg.get("gradient_accumulation_steps", args.grad_accum)) != int(args.grad_accum):
            raise PacktrainError(f"{where}: gradient_accumulation_steps differs from --grad-accum "
                                 f"{args.grad_accum}; set it with --grad-accum")
        cfg.pop("train_batch_size", None)
        if "optimizer" in cfg or "scheduler" in cfg:
            raise PacktrainError(f"{where}: 'optimizer'/'scheduler' sections are not used: packtrain "
                                 f"passes its own (--lr, --weight-decay, --schedule); remove them")
    return cfg
