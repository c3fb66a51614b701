"""Variable-length ("packed") attention for Hugging Face causal LMs.

The job
-------
A packed row holds several samples back to back: ``input_ids`` of shape [1, T], ``position_ids``
restarting at 0 at every sample start, and ``cu_seqlens`` = [0, end of sample 1, ..., T].  Every
token must attend only to earlier tokens *of its own sample*, so that training on packs computes
exactly what training on the samples one by one computes.

This module registers attention functions with transformers' ``AttentionInterface`` that read the
sample boundaries from the ``cu_seq_lens_q``/``cu_seq_lens_k``/``max_length_q``/``max_length_k``
keyword arguments (which transformers forwards from ``model(...)`` down to the attention function)
and run one of:

``packtrain_sdpa``   an exact per-sample loop of ``F.scaled_dot_product_attention`` over cu_seqlens.
                     Works everywhere; the fastest choice on CPU (no T x T mask is ever built).
``packtrain_torch``  PyTorch's own varlen kernel, ``torch.nn.attention.varlen.varlen_attn`` (CUDA).
``packtrain_flash``  ``flash_attn.flash_attn_varlen_func`` when the flash-attn package imports (CUDA).

Use it like this::

    name = select_backend("auto", device, dtype)     # -> "packtrain_torch", ...
    enable_packed_attention(model, name)
    out = model(input_ids=ids, **packed_forward_kwargs(cu_seqlens, position_ids))

The traps (each one silently produces wrong numbers or a confusing failure)
---------------------------------------------------------------------------
1. ``use_cache=False`` always.  With the default ``use_cache=True`` (even in train mode) transformers
   creates a DynamicCache, does not detect the packed layout, and the built-in sdpa/eager paths let
   samples attend to each other (logit differences ~0.5, no error).  ``packed_forward_kwargs`` sets it.
2. ``attention_mask=None``.  A 2D padding mask makes transformers build a mask that ignores packing.
3. Mask creation: transformers builds a mask for ``config._attn_implementation`` before calling the
   attention function.  A custom name must also be registered with ``AttentionMaskInterface``
   (some versions fail otherwise); ours returns ``None``: the boundaries come from cu_seqlens.
4. Only models whose attention goes through ``AttentionInterface`` (``_supports_attention_backend``)
   can use these backends; for any other model, setting the implementation would be ignored and the
   model would attend across samples.  ``enable_packed_attention`` refuses such models by name.
5. Batch must be 1: one packed row, samples delimited by cu_seqlens (merge several packs into one
   row and concatenate their cu_seqlens instead of stacking them).
6. The CUDA kernels take fp16/bf16 only.  fp32 q/k/v are cast to the autocast dtype when autocast is
   on, otherwise refused with a clear error (use ``packtrain_sdpa`` for fp32).
7. No KV cache: these backends are for training/scoring whole packs, not for ``generate()``.

Only ``torch`` and ``transformers`` are imported at module level, so this imports on machines without
deepspeed or flash-attn.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel

try:  # transformers >= 4.53
    from transformers.masking_utils import AttentionMaskInterface
except ImportError:  # pragma: no cover - older transformers
    AttentionMaskInterface = None

__all__ = [
    "AttentionBackendError",
    "BACKENDS",
    "BACKEND_NAMES",
    "select_backend",
    "enable_packed_attention",
    "packed_forward_kwargs",
    "register_backends",
    "flash_attn_available",
    "torch_varlen_available",
    "cu_seqlens_from_position_ids",
    "unwrap_model",
    "refuse_unsupported",
    "no_mask",
]


class AttentionBackendError(ValueError):
    """A packed-attention backend cannot be used (unavailable, wrong inputs, unsupported model)."""


# Short name (as given to --attn) -> name registered with transformers.
BACKENDS = {
    "sdpa": "packtrain_sdpa",
    "torch": "packtrain_torch",
    "flash": "packtrain_flash",
}
BACKEND_NAMES = tuple(BACKENDS.values())
_HALF = (torch.float16, torch.bfloat16)
_REQUIRE_CUDA = True  # tests switch it off to drive the CUDA adapters with a CPU stand-in kernel


# --------------------------------------------------------------------------------------------------
# Boundaries: cu_seqlens as a validated tensor and as Python ints (cached: one host sync per forward)
# --------------------------------------------------------------------------------------------------


class _Boundaries:
    """Single-slot cache of the last cu_seqlens tensor seen, keyed by identity (or the same memory)
    and version, so a forward over N layers converts and validates it once (not N times, each a
    device sync)."""

    def __init__(self):
        self._cu = None
        self._version = None
        self._value = None

    def _holds(self, cu: torch.Tensor) -> bool:
        ref = self._cu
        if ref is None or self._version != cu._version:
            return False
        # torch.compile hands the attention custom op (train.attention_op) another tensor object
        # over the graph input's memory: the same memory, layout and version is the same tensor.
        # The cache's strong reference keeps that memory from going to any other tensor meanwhile.
        return ref is cu or (ref.data_ptr() == cu.data_ptr() and ref.device == cu.device
                             and ref.dtype == cu.dtype and ref.shape == cu.shape
                             and ref.stride() == cu.stride())

    def get(self, cu: torch.Tensor, total: int, backend: str, device: torch.device):
        """(bounds as ints, longest sample, cu_seqlens int32 on ``device``)."""
        if not (self._holds(cu) and self._value[0] == total):
            self._value = self._convert(cu, total, backend)
            self._cu, self._version = cu, cu._version
        total, bounds, max_len, cu32 = self._value
        if cu32.device != device:
            cu32 = cu32.to(device)
            self._value = (total, bounds, max_len, cu32)
        return bounds, max_len, cu32

    def seed(self, cu: torch.Tensor, bounds: list[int]) -> None:
        """Take `bounds` (checked on the host) as the values of `cu`: no read back from the device."""
        self._value = (bounds[-1], bounds, max(e - s for s, e in zip(bounds[:-1], bounds[1:])), cu)
        self._cu, self._version = cu, cu._version

    @staticmethod
    def _convert(cu: torch.Tensor, total: int, backend: str):
        bounds = [int(x) for x in cu.tolist()]
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
            raise AttentionBackendError(
                f"{backend}: cu_seqlens must start at 0 and end at the row length {total}; got "
                f"{_short(bounds)}"
            )
        lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        if min(lengths) <= 0:
            raise AttentionBackendError(f"{backend}: cu_seqlens must be strictly increasing; got {_short(bounds)}")
        return total, bounds, max(lengths), cu.to(dtype=torch.int32)


_BOUNDS = _Boundaries()


def _short(values, n: int = 8) -> str:
    values = list(values)
    return str(values) if len(values) <= n else f"[{', '.join(map(str, values[:n]))}, ...] ({len(values)} values)"


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """cu_seqlens (int32) from position_ids of one packed row: a sample starts wherever the position
    does not continue the previous one (the rule transformers uses to detect packing)."""
    pos = position_ids.reshape(-1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    idx = torch.nonzero(starts).flatten()
    end = torch.tensor([pos.numel()], device=pos.device, dtype=idx.dtype)
    return torch.cat([idx, end]).to(torch.int32)


def _boundaries(backend: str, query: torch.Tensor, key: torch.Tensor, kwargs: dict):
    """Validate the call and return (bounds list, max sample length, cu_seqlens int32 on device)."""
    if query.dim() != 4:
        raise AttentionBackendError(f"{backend}: expected q/k/v as [batch, heads, T, head_dim], got {tuple(query.shape)}")
    if query.shape[0] != 1:
        raise AttentionBackendError(
            f"{backend}: batch size must be 1 (one packed row, samples delimited by cu_seqlens); got batch "
            f"{query.shape[0]}. Concatenate packs into one row and merge their cu_seqlens instead."
        )
    total = query.shape[2]
    if key.shape[2] != total:
        raise AttentionBackendError(
            f"{backend}: query length {total} != key length {key.shape[2]}: packed backends do not support a KV "
            "cache (pass use_cache=False; switch back to 'sdpa' for generation)"
        )
    cu = kwargs.get("cu_seq_lens_q")
    cu_k = kwargs.get("cu_seq_lens_k")
    if cu is None:
        pos = kwargs.get("position_ids")
        if pos is None:
            raise AttentionBackendError(
                f"{backend}: no sample boundaries: call the model with "
                "**packed_forward_kwargs(cu_seqlens, position_ids) (cu_seq_lens_q/k, max_length_q/k, position_ids)"
            )
        cu = cu_seqlens_from_position_ids(pos)
    elif cu_k is not None and cu_k is not cu and not torch.equal(cu_k, cu):
        raise AttentionBackendError(f"{backend}: cu_seq_lens_k must equal cu_seq_lens_q (self-attention over one packed row)")
    if cu.dim() != 1:
        cu = cu.reshape(-1)  # (a new view each call: the cache below then converts once per layer)
    return _BOUNDS.get(cu, total, backend, query.device)


def refuse_unsupported(backend: str, module, kwargs: dict, *, softcap_ok: bool) -> None:
    """AttentionBackendError for what the packed backends do not do: non-causal attention, sinks,
    an additive position bias, and logit softcapping unless `softcap_ok`."""
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if not is_causal:
        raise AttentionBackendError(f"{backend}: only causal self-attention is supported (got is_causal=False)")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise AttentionBackendError(f"{backend}: attention sinks (s_aux) are not supported")
    if kwargs.get("position_bias") is not None:
        raise AttentionBackendError(f"{backend}: additive position bias is not supported")
    if not softcap_ok and kwargs.get("softcap") is not None:
        raise AttentionBackendError(f"{backend}: attention logit softcapping is not supported; use packtrain_sdpa or packtrain_flash")


def _num_kv_groups(module, query: torch.Tensor, key: torch.Tensor) -> int:
    hq, hk = query.shape[1], key.shape[1]
    if hq % hk:
        raise AttentionBackendError(f"query heads {hq} not a multiple of key/value heads {hk}")
    return hq // hk


def _repeat_kv(x: torch.Tensor, n_rep: int, dim: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=dim)


# --------------------------------------------------------------------------------------------------
# packtrain_sdpa: exact per-sample SDPA
# --------------------------------------------------------------------------------------------------


def _window_mask(length: int, window: int, device) -> torch.Tensor:
    """Boolean [L, L] mask, True where attending is allowed: causal and q - k < window (transformers'
    sliding_window_overlay: kv_idx > q_idx - sliding_window)."""
    i = torch.arange(length, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window)


def _eager_sample(q, k, v, scaling, softcap, mask, dropout, training):
    """One sample, [1, H, L, D] each (k/v already repeated to H heads). fp32 softmax as HF eager."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    length = q.shape[2]
    if mask is None:
        mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril_()
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, v)


def packtrain_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Exact causal attention inside each sample of one packed row: a loop of SDPA calls over the
    samples (no T x T mask). Handles GQA, dropout, sliding windows and softcap (eager per sample)."""
    backend = "packtrain_sdpa"
    refuse_unsupported(backend, module, {**kwargs, "softcap": softcap}, softcap_ok=True)
    bounds, _, _ = _boundaries(backend, query, key, kwargs)
    n_rep = _num_kv_groups(module, query, key)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    training = dropout > 0.0
    outs = []
    masks: dict[int, torch.Tensor] = {}
    # torch.split, not slicing: the backward of each slice would allocate a zero gradient of the
    # whole row and add into it (samples x T work; 4.0 s vs 0.22 s per layer at 32k/218 samples).
    sizes = [e - s for s, e in zip(bounds[:-1], bounds[1:])]  # validated by _boundaries
    for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2)):
        length = q.shape[2]
        mask = None
        if sliding_window is not None and length > sliding_window:
            mask = masks.get(length)
            if mask is None:
                mask = masks[length] = _window_mask(length, sliding_window, query.device)
        if softcap is not None:
            o = _eager_sample(q, _repeat_kv(k, n_rep, 1), _repeat_kv(v, n_rep, 1), scaling, softcap, mask, dropout, training)
        elif mask is not None:
            o = F.scaled_dot_product_attention(
                q, _repeat_kv(k, n_rep, 1), _repeat_kv(v, n_rep, 1), attn_mask=mask, dropout_p=dropout, scale=scaling
            )
        elif n_rep > 1:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
        outs.append(o)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------------------------------
# CUDA kernels: torch varlen and flash-attn
# --------------------------------------------------------------------------------------------------


def _half_inputs(backend: str, module, query, key, value):
    """The CUDA varlen kernels take fp16/bf16. Cast fp32 inputs to the autocast dtype (as transformers'
    flash integration does; under autocast RoPE leaves q/k in fp32) or refuse."""
    if query.dtype in _HALF and key.dtype == query.dtype and value.dtype == query.dtype:
        return query, key, value
    dev = query.device.type
    if query.dtype in _HALF:
        target = query.dtype
    elif torch.is_autocast_enabled(dev):
        target = torch.get_autocast_dtype(dev)
    else:
        raise AttentionBackendError(
            f"{backend} needs fp16/bf16 q/k/v, got {query.dtype}: train in bf16 (or under autocast), or use "
            "--attn sdpa (packtrain_sdpa) for fp32"
        )
    return query.to(target), key.to(target), value.to(target)


@functools.lru_cache(maxsize=None)
def _torch_varlen():
    """(varlen_attn, its parameter names) or (None, reason)."""
    try:
        mod = importlib.import_module("torch.nn.attention.varlen")
        fn = mod.varlen_attn
    except (ImportError, AttributeError) as e:
        return None, f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn ({e})"
    return fn, frozenset(inspect.signature(fn).parameters)


def torch_varlen_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(usable, reason). Needs CUDA and torch.nn.attention.varlen.varlen_attn."""
    fn, info = _torch_varlen()
    if fn is None:
        return False, info
    if not torch.cuda.is_available():
        return False, "torch varlen attention is CUDA only and CUDA is not available"
    if device is not None and torch.device(device).type != "cuda":
        return False, f"torch varlen attention is CUDA only; device is {torch.device(device)}"
    return True, "ok"


def packtrain_torch_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """PyTorch's varlen flash kernel over the packed row. Adapts to the varlen_attn signature of the
    installed torch (scale / window_size / enable_gqa keywords are newer than the function itself)."""
    backend = "packtrain_torch"
    refuse_unsupported(backend, module, {**kwargs, "softcap": softcap}, softcap_ok=False)
    if dropout > 0.0:
        raise AttentionBackendError(
            f"{backend}: torch varlen_attn has no attention dropout (model attention_dropout={dropout}); "
            "use packtrain_flash or packtrain_sdpa, or set attention_dropout=0"
        )
    fn, params = _torch_varlen()
    if fn is None:
        raise AttentionBackendError(f"{backend}: {params}")
    if query.device.type != "cuda" and _REQUIRE_CUDA:
        raise AttentionBackendError(f"{backend}: CUDA only; tensors are on {query.device}")
    _, max_len, cu = _boundaries(backend, query, key, kwargs)
    n_rep = _num_kv_groups(module, query, key)
    out_dtype = query.dtype
    query, key, value = _half_inputs(backend, module, query, key, value)
    head_dim = query.shape[-1]
    # [1, H, T, D] -> [T, H, D]
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    kw = {}
    window = sliding_window if (sliding_window is not None and max_len > sliding_window) else None
    if "window_size" in params:
        kw["window_size"] = (window - 1, 0) if window is not None else (-1, 0)  # tuple: (-1, 0) means causal
    elif "is_causal" in params:
        if window is not None:
            raise AttentionBackendError(
                f"{backend}: this torch's varlen_attn has no sliding window and a sample ({max_len} tokens) is longer "
                f"than the model's sliding_window {sliding_window}; use packtrain_sdpa or packtrain_flash"
            )
        kw["is_causal"] = True
    else:  # pragma: no cover - unknown API
        raise AttentionBackendError(f"{backend}: unrecognised varlen_attn signature {sorted(params)}")
    if n_rep > 1:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = _repeat_kv(k, n_rep, 1), _repeat_kv(v, n_rep, 1)
    default_scale = head_dim**-0.5
    if scaling is not None and not math.isclose(scaling, default_scale, rel_tol=1e-12):
        if "scale" in params:
            kw["scale"] = scaling
        else:
            q = q * (scaling / default_scale)
    out = fn(q, k, v, cu, cu, max_len, max_len, **kw)
    return out.unsqueeze(0).to(out_dtype), None


@functools.lru_cache(maxsize=None)
def _flash_attn():
    """(flash_attn_varlen_func, its parameter names) or (None, reason)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception as e:  # ImportError, or an ABI mismatch surfacing as OSError/RuntimeError
        return None, f"flash_attn is not importable ({type(e).__name__}: {e})"
    return flash_attn_varlen_func, frozenset(inspect.signature(flash_attn_varlen_func).parameters)


def flash_attn_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(usable, reason). Needs CUDA and an importable flash_attn package."""
    if not torch.cuda.is_available():
        return False, "flash-attn needs CUDA and CUDA is not available"
    if device is not None and torch.device(device).type != "cuda":
        return False, f"flash-attn is CUDA only; device is {torch.device(device)}"
    fn, info = _flash_attn()
    if fn is None:
        return False, info
    return True, "ok"


def packtrain_flash_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """flash_attn.flash_attn_varlen_func over the packed row (native GQA, dropout, window, softcap)."""
    backend = "packtrain_flash"
    fn, params = _flash_attn()
    if fn is None:
        raise AttentionBackendError(f"{backend}: {params}")
    refuse_unsupported(backend, module, kwargs, softcap_ok="softcap" in params)
    if query.device.type != "cuda" and _REQUIRE_CUDA:
        raise AttentionBackendError(f"{backend}: CUDA only; tensors are on {query.device}")
    _, max_len, cu = _boundaries(backend, query, key, kwargs)
    _num_kv_groups(module, query, key)
    out_dtype = query.dtype
    query, key, value = _half_inputs(backend, module, query, key, value)
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    kw = {"dropout_p": dropout, "softmax_scale": scaling, "causal": True}
    window = sliding_window if (sliding_window is not None and max_len > sliding_window) else None
    if window is not None:
        if "window_size" not in params:
            raise AttentionBackendError(f"{backend}: this flash_attn has no sliding window support (need >= 2.3)")
        kw["window_size"] = (window - 1, 0)
    if softcap is not None:
        kw["softcap"] = softcap
    out = fn(q, k, v, cu, cu, max_len, max_len, **kw)
    return out.unsqueeze(0).to(out_dtype), None


def no_mask(*args, **kwargs):
    """Mask builder for our backends: none needed, boundaries come from cu_seqlens."""
    return None


_FUNCTIONS = {
    "packtrain_sdpa": packtrain_sdpa_attention,
    "packtrain_torch": packtrain_torch_attention,
    "packtrain_flash": packtrain_flash_attention,
}


def register_backends() -> None:
    """Register the three backends (idempotent; done at import)."""
    for name, fn in _FUNCTIONS.items():
        AttentionInterface.register(name, fn)
        if AttentionMaskInterface is not None:
            AttentionMaskInterface.register(name, no_mask)


register_backends()


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def _normalise(requested: str) -> str:
    r = (requested or "auto").strip().lower()
    if r in BACKEND_NAMES:
        r = r[len("packtrain_"):]
    if r not in ("auto", *BACKENDS):
        raise AttentionBackendError(f"unknown attention backend {requested!r}; choose one of auto, flash, torch, sdpa")
    return r


def select_backend(requested: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """Resolve ``--attn auto|flash|torch|sdpa`` to a registered backend name.

    auto: packtrain_flash if flash_attn imports and the device is CUDA, else packtrain_torch on CUDA
    when torch has varlen_attn, else packtrain_sdpa. When ``dtype`` is given and is not fp16/bf16,
    auto picks packtrain_sdpa (the CUDA kernels are half precision only; under autocast pass the
    autocast dtype). An explicitly requested backend that cannot run here (no CUDA, package missing,
    fp32 dtype for a CUDA kernel) raises AttentionBackendError with the reason.
    """
    r = _normalise(requested)
    device = torch.device(device)
    if r == "sdpa":
        return BACKENDS["sdpa"]
    if r in ("flash", "torch"):
        ok, why = (flash_attn_available if r == "flash" else torch_varlen_available)(device)
        if not ok:
            raise AttentionBackendError(f"--attn {r} unavailable: {why}")
        if dtype is not None and dtype not in _HALF:
            raise AttentionBackendError(
                f"--attn {r} needs bf16/fp16 training, not {str(dtype).replace('torch.', '')}; use --attn sdpa for fp32"
            )
        return BACKENDS[r]
    if dtype is not None and dtype not in _HALF:
        return BACKENDS["sdpa"]
    if flash_attn_available(device)[0]:
        return BACKENDS["flash"]
    if torch_varlen_available(device)[0]:
        return BACKENDS["torch"]
    return BACKENDS["sdpa"]


def unwrap_model(model) -> PreTrainedModel:
    """The Hugging Face PreTrainedModel inside peft / DeepSpeed / DDP wrappers."""
    seen = 0
    while not isinstance(model, PreTrainedModel) and seen < 8:
        seen += 1
        if hasattr(model, "get_base_model"):  # peft PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DeepSpeedEngine, DDP
            model = model.module
        else:
            break
    return model


def enable_packed_attention(model, backend: str) -> None:
    """Switch ``model`` (a PreTrainedModel, or a peft/DeepSpeed/DDP wrapper around one) to one of the
    packtrain backends (short or registered name). Raises AttentionBackendError naming the model class
    when its attention does not go through transformers' AttentionInterface."""
    name = BACKENDS[_normalise(backend)] if _normalise(backend) != "auto" else None
    if name is None:
        raise AttentionBackendError("enable_packed_attention needs a concrete backend; resolve 'auto' with select_backend first")
    base = unwrap_model(model)
    if not isinstance(base, PreTrainedModel):
        raise AttentionBackendError(
            f"{type(model).__name__} is not a transformers PreTrainedModel; packed attention needs one whose attention "
            "goes through AttentionInterface"
        )
    cls = type(base).__name__
    if not getattr(type(base), "_supports_attention_backend", False):
        raise AttentionBackendError(
            f"{cls} does not route its attention through transformers' AttentionInterface "
            "(_supports_attention_backend is False), so packed samples would attend to each other; "
            "use a model that does (e.g. Llama, Qwen2, Qwen3, Mistral)"
        )
    register_backends()
    setter = getattr(base, "set_attn_implementation", None)
    if setter is not None:
        try:
            setter(name)
        except Exception as e:
            raise AttentionBackendError(f"{cls}: could not set attention implementation {name!r}: {e}") from e
    else:  # pragma: no cover - older transformers
        base.config._attn_implementation = name
    if base.config._attn_implementation != name:
        raise AttentionBackendError(
            f"{cls} refused attention implementation {name!r} (still {base.config._attn_implementation!r}); "
            "its attention does not follow AttentionInterface"
        )
    # Sub-configs (e.g. a text_config) that the top-level setter did not reach
    for sub in getattr(base.config, "sub_configs", {}) or {}:
        sc = getattr(base.config, sub, None)
        if sc is not None and hasattr(sc, "_attn_implementation") and sc._attn_implementation != name:
            raise AttentionBackendError(f"{cls}: sub-config {sub!r} kept attention {sc._attn_implementation!r}")


def packed_forward_kwargs(
    cu_seqlens: torch.Tensor,
    position_ids: torch.Tensor,
    max_length: int | None = None,
    validate: bool = True,
    bounds: list[int] | None = None,
) -> dict:
    """Keyword arguments for ``model(input_ids=..., **kwargs)`` on one packed row.

    Returns position_ids as [1, T] int64, cu_seq_lens_q/k (int32, on position_ids' device),
    max_length_q/k (int), use_cache=False and attention_mask=None. ``max_length`` (the longest sample)
    is computed when not given (one host sync). With ``validate`` the boundaries are checked:
    cu_seqlens starts at 0, strictly increases and ends at T, and position_ids restart at 0 exactly at
    each sample start and count up by one inside a sample. ``bounds``: cu_seqlens as ints, checked
    on the host (the training step's packs): no validation, and the backends read no boundary back
    from the device.
    """
    pos = torch.as_tensor(position_ids)
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    if pos.dim() != 2 or pos.shape[0] != 1:
        raise AttentionBackendError(f"position_ids must be [T] or [1, T] (one packed row); got {tuple(pos.shape)}")
    pos = pos.to(torch.long)
    cu = torch.as_tensor(cu_seqlens).reshape(-1).to(device=pos.device, dtype=torch.int32)
    total = pos.shape[1]
    if bounds is not None:
        if len(bounds) != cu.numel() or bounds[-1] != total:
            raise AttentionBackendError(f"host bounds {_short(bounds)} do not describe {total} tokens")
        _BOUNDS.seed(cu, bounds)
        validate = False
        if max_length is None:
            max_length = max(e - s for s, e in zip(bounds[:-1], bounds[1:]))
    if validate or max_length is None:
        bounds = [int(x) for x in cu.tolist()]
        lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        if validate:
            if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total or min(lengths) <= 0:
                raise AttentionBackendError(
                    f"cu_seqlens must start at 0, strictly increase and end at T={total}; got {_short(bounds)}"
                )
            sample_id = torch.repeat_interleave(
                torch.arange(len(lengths), device=pos.device), torch.tensor(lengths, device=pos.device)
            )
            starts = cu[:-1].to(torch.long)
            expected = torch.arange(total, device=pos.device) - starts[sample_id]
            if not torch.equal(pos[0], expected):
                bad = int(torch.nonzero(pos[0] != expected)[0])
                raise AttentionBackendError(
                    f"position_ids do not restart at cu_seqlens: position {bad} is {int(pos[0, bad])}, expected "
                    f"{int(expected[bad])}"
                )
        if max_length is None:
            max_length = max(lengths)
    max_length = int(max_length)
    return {
        "position_ids": pos,
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max_length,
        "max_length_k": max_length,
        "use_cache": False,
        "attention_mask": None,
    }
