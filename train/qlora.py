"""QLoRA (train-run --qlora): the base model loaded as bitsandbytes NF4 with double quantisation,
LoRA adapters trained on top, and the pieces export needs to rebuild that base.

* `settings(dtype)` / `quantization_config(settings)`: the BitsAndBytesConfig train-run and export
  both load with (NF4, double quantisation, compute dtype = the run's --dtype). The same full-precision base
  quantised with it gives the same 4-bit weights, which is how export recovers the base the
  adapters were trained against without storing it.
* `check_args(args)`: what --qlora cannot be combined with, refused in one line.
* `keep_autograd(model)`: bitsandbytes' CPU pitfall, switched off (see its docstring).
* `dequantized_base(model_path, settings)`: the NF4 base dequantised to plain nn.Linear layers
  (export's merged model).

peft's prepare_model_for_kbit_training is not used: it casts every non-quantised parameter
(embeddings, norms, lm_head) to fp32 and hooks the input embeddings to require grad. The hook is
for reentrant gradient checkpointing, which packtrain never uses (use_reentrant=False); and with
--dtype bf16 DeepSpeed casts every floating parameter back to the training dtype at initialize
(engine._cast_module_mixed_precision), so the fp32 copies would only cost memory until then
(measured on the tests' tiny Llama in bf16: non-quantised weights 15.7 -> 31.3 MiB) and change
no number after; with --dtype fp32 it changes nothing at all.
"""

from __future__ import annotations

import importlib.util
from argparse import Namespace
from pathlib import Path
from typing import Any

from pack.errors import PacktrainError

QUANT_TYPE = "nf4"
SETTINGS_FILE = "qlora.json"  # in OUTPUT/model_config/: how export re-quantises the base
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def settings(dtype: str) -> dict:
    """The quantisation of a --qlora run with compute dtype `dtype` (bf16/fp16/fp32), as JSON.
    The 4-bit weights are stored in the compute dtype's bytes (bnb_4bit_quant_storage), as
    peft/accelerate document for ZeRO-3 and FSDP (partitions gathered with the model's float
    parameters); it equals the training dtype, so DeepSpeed's mixed-precision cast, which would
    convert float-typed 4-bit bytes by value, leaves them alone. Measured on 2 CPU ranks
    (DeepSpeed 0.19.8, persistence threshold 0): ZeRO-3 partitions and trains the 4-bit weights
    with uint8 storage too, to the same losses."""
    d = TORCH_DTYPES[dtype]
    return {"quant_type": QUANT_TYPE, "double_quant": True, "compute_dtype": d,
            "quant_storage": d}


def quantization_config(s: dict) -> Any:
    """transformers' BitsAndBytesConfig for settings `s` (see `settings`)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=s["quant_type"],
                              bnb_4bit_use_double_quant=bool(s["double_quant"]),
                              bnb_4bit_compute_dtype=getattr(torch, s["compute_dtype"]),
                              bnb_4bit_quant_storage=getattr(torch, s["quant_storage"]))


def check_installed() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PacktrainError("--qlora needs bitsandbytes: pip install 'packtrain[qlora]'")


def check_args(args: Namespace) -> None:
    """--qlora's refusals, one line each. --qlora implies --lora (set here)."""
    if not args.qlora:
        return
    check_installed()
    args.lora = True
    if args.offload == "param":
        raise PacktrainError("--qlora with --offload param: DeepSpeed cannot offload 4-bit "
                             "parameters; use --offload optimizer or none")
    if args.dtype == "fp16":
        raise PacktrainError("--qlora with --dtype fp16: not supported (DeepSpeed's fp16 loss "
                             "scaler over a 4-bit base is untested here); use --dtype bf16 or fp32")


def keep_autograd(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    bitsandbytes 0.50 (Linear4bit.forward): on a CPU with AVX512-BF16, a forward in eval mode
    whose input does not require grad converts the weight, permanently, to a layout that
    matmul_4bit then always sends to a kernel without autograd; after one evaluation, training
    steps silently lose the gradient through every 4-bit layer (measured here: LoRA gradients off
    by up to 0.08 after one eval forward). Clearing the module's CPU-capability flag keeps the
    ordinary dequantise-and-matmul path, which has a backward. Returns the layers changed."""
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def describe(model: Any, s: dict) -> str:
    """The start-up line: QLoRA's settings and the trainable share of parameters."""
    trainable = total = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)  # a 4-bit weight: count its logical elements
        n = qs.shape.numel() if qs is not None else getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return (f"QLoRA: {s['quant_type']} base, double quant {'on' if s['double_quant'] else 'off'}, "
            f"compute dtype {s['compute_dtype']}, trainable params {trainable:,} of {total:,} "
            f"({100 * trainable / max(total, 1):.2f}%)")


def load_quantized(model_path: str | Path, s: dict, device: Any = "cpu", **kw) -> Any:
    """The causal LM at `model_path` loaded 4-bit with settings `s`, autograd-safe on CPU
    (with output_loading_info=True in `kw`: (model, info), as from_pretrained returns)."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(
        str(model_path), quantization_config=quantization_config(s),
        dtype=getattr(torch, s["compute_dtype"]),
        **({} if device is None else {"device_map": {"": device}}),
        local_files_only=True, trust_remote_code=False, **kw)
    keep_autograd(loaded[0] if isinstance(loaded, tuple) else loaded)
    return loaded


def dequantized_base(model_path: str | Path, s: dict) -> tuple[Any, dict]:
    """(model, packed): the base as trained against, quantised with `s`, then every 4-bit layer
    dequantised to an nn.Linear in the compute dtype (not the original full-precision weights);
    `packed` maps each 4-bit weight's name to its stored bytes (what a checkpoint holds of it)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # export prints its own one-line result or error
    try:
        model = load_quantized(model_path, s, "cpu")
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
    packed = {f"{name}.weight": m.weight.data.clone() for name, m in model.named_modules()
              if hasattr(getattr(m, "weight", None), "quant_state")}
    model = model.dequantize()
    cfg = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    return model, packed


def same_bytes(fresh: Any, saved: Any) -> bool:
    """Whether `saved` (a 4-bit weight as a checkpoint read back, floating storage upcast to
    fp32) holds the bytes of `fresh` (the same weight quantised now). Compared as bit patterns:
    the packed bytes read as floats may be NaN."""
    import torch

    if tuple(fresh.shape) != tuple(saved.shape):
        return False
    if not fresh.is_floating_point():
        return bool(torch.equal(fresh, saved))
    return bool(torch.equal(fresh.float().view(torch.int32), saved.float().view(torch.int32)))
