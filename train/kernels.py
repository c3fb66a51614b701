"""train-run --kernels: liger-kernel's fused Triton kernels (GPU only) where installed.

``--kernels liger`` patches the model *instance* with liger-kernel's fused RMSNorm, RoPE and SwiGLU
(its per-model ``apply_liger_kernel_to_<model type>(model=...)``; their RoPE also replaces the
module-level ``apply_rotary_pos_emb`` of that model type, for this process). packtrain's chunked
cross-entropy stays the loss. ``--kernels liger-flce`` also computes the training loss with liger's
fused linear cross-entropy (``liger_linear_cross_entropy``), which, like the chunked loss, never
builds [T, V] logits; it is opt-in until benchmarks/gpu_check.py's kernels section has compared it
with the chunked loss on a GPU (there are reports of wrong gradients with reduction='none', which
is not used here: the sum over the label tokens only, the same tokens the chunked loss selects).
``--kernels auto``: liger when it imports and the device is CUDA, else none (never -flce).

The start-up line names what was chosen and why; an explicit choice that cannot run here (no
CUDA, liger-kernel or triton missing, a model type liger does not know) is refused in one line.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from pack.errors import PacktrainError

__all__ = ["KERNELS", "liger_available", "select_kernels", "apply_kernels", "loss_kernel",
           "liger_linear_cross_entropy"]

KERNELS = ("auto", "none", "liger", "liger-flce")


@functools.lru_cache(maxsize=None)
def _liger_patch_module():
    """liger_kernel.transformers.monkey_patch, or the reason it does not import."""
    try:
        from liger_kernel.transformers import monkey_patch
    except Exception as e:  # ImportError (liger-kernel or triton missing), or a broken install
        return None, f"liger-kernel is not importable ({type(e).__name__}: {str(e)[:120]})"
    return monkey_patch, "ok"


def liger_available(device: torch.device | str) -> tuple[bool, str]:
    """(usable, reason): liger-kernel's Triton kernels need CUDA and an importable package."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"liger-kernel's Triton kernels need CUDA; the device is {device.type}"
    mod, why = _liger_patch_module()
    return mod is not None, why


def select_kernels(requested: str, device: torch.device | str, compiled: bool = False
                   ) -> tuple[str, str]:
    """(kernels, why) for --kernels auto|none|liger|liger-flce on `device`; `compiled`: --compile
    is on (auto then picks none: torch.compile generates its own fused kernels, and liger's
    inside compiled layers is not checked yet)."""
    if requested not in KERNELS:
        raise PacktrainError(f"--kernels {requested!r}: choose one of {', '.join(KERNELS)}")
    if requested == "none":
        return "none", "--kernels none"
    if compiled:
        if requested != "auto":
            raise PacktrainError(f"--kernels {requested} with --compile is not checked yet; "
                                 f"choose one of them (--compile fuses the layers itself)")
        return "none", "--kernels auto with --compile: inductor fuses the layers itself"
    ok, why = liger_available(device)
    if requested == "auto":
        return ("liger", "--kernels auto: liger-kernel imports, CUDA") if ok else \
            ("none", f"--kernels auto: {why}")
    if not ok:
        raise PacktrainError(f"--kernels {requested}: {why}; use --kernels none or auto")
    return requested, f"--kernels {requested}"


def apply_kernels(model: Any, kernels: str) -> str:
    """Patch `model` (a HF model, or a peft/DeepSpeed wrapper around one) with the kernels chosen by
    select_kernels; returns what was patched, for the start-up line."""
    if kernels == "none":
        return "none"
    from train.attention import unwrap_model

    mod, why = _liger_patch_module()
    if mod is None:
        raise PacktrainError(f"--kernels {kernels}: {why}")
    base = unwrap_model(model)
    model_type = getattr(base.config, "model_type", None)
    fn = mod.MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if fn is None:
        raise PacktrainError(f"--kernels {kernels}: liger-kernel has no kernels for model type "
                             f"{model_type!r}; use --kernels none")
    params = inspect.signature(fn).parameters
    act = getattr(base.config, "hidden_act", "silu")
    if "swiglu" in params and act not in ("silu", "swish"):
        raise PacktrainError(f"--kernels {kernels}: liger's SwiGLU assumes a silu activation; "
                             f"{model_type} has {act!r}; use --kernels none")
    wanted = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                  fused_linear_cross_entropy=False)  # the loss is packtrain's, never model.forward
    kw = {k: v for k, v in wanted.items() if k in params}
    fn(model=base, **kw)
    done = [name for name, key in (("RMSNorm", "rms_norm"), ("RoPE", "rope"), ("SwiGLU", "swiglu"))
            if kw.get(key)]
    loss = ", fused linear cross-entropy" if kernels == "liger-flce" else ""
    return f"liger ({', '.join(done)}{loss})"


def loss_kernel(kernels: str) -> str:
    """The training loss's kernel for a --kernels choice: 'liger' or 'chunked'."""
    return "liger" if kernels == "liger-flce" else "chunked"


def liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               bias: torch.Tensor | None = None, softcap: float | None = None
                               ) -> torch.Tensor:
    """Summed CE of `hidden` [N, H] under the head `weight` [V, H] (+ `bias`) against `targets`
    [N] (already shifted and selected: all valid; -100 would be ignored) with liger-kernel's fused
    linear cross-entropy; an fp32 scalar. The weight gradient accumulates over liger's chunks in
    fp32, as the chunked loss's does (liger's default would accumulate in the weight's bf16)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    loss = liger_fused_linear_cross_entropy(hidden, weight, targets, bias=bias, ignore_index=-100,
                                            reduction="sum", softcap=softcap,
                                            accum_dtype=torch.float32)
    return loss.float()
