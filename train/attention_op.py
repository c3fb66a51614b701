"""packtrain's varlen attention as one opaque torch.library custom op, for torch.compile.

Traced by dynamo, the packtrain_sdpa backend's Python loop over the samples of a pack would be
unrolled into the graph (one graph per sample layout: a recompile every step) and the flash /
torch varlen kernels would break the graph. Wrapped as the custom op ``packtrain::varlen_attention``
the whole packed attention is one node: dynamo sees only its inputs and the shape of its output
(``register_fake``), and autograd sees a backward that is a second opaque op,
``packtrain::varlen_attention_backward``.

The backward recomputes the attention under autograd and differentiates it (so it is exact for
every backend, with no kernel-specific saved state): the price is one extra attention forward per
layer in backward. Dropout inside the op is refused (the recomputation would draw another mask).

``enable_compiled_attention(model, backend)`` switches a model (already set to a packtrain backend
with train.attention.enable_packed_attention) to the op form of that backend, registered with
transformers' AttentionInterface as ``<backend>_op``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from train.attention import (BACKEND_NAMES, AttentionBackendError, no_mask, refuse_unsupported,
                             unwrap_model)

try:  # transformers >= 4.53
    from transformers.masking_utils import AttentionMaskInterface
except ImportError:  # pragma: no cover - older transformers
    AttentionMaskInterface = None

__all__ = ["OP_SUFFIX", "enable_compiled_attention", "varlen_attention"]

OP_SUFFIX = "_op"
_CAUSAL = SimpleNamespace(is_causal=True)  # the backends read only is_causal from the module


def _run(query, key, value, cu_seqlens, backend, scaling, window, softcap):
    if backend not in BACKEND_NAMES:
        raise AttentionBackendError(f"packtrain::varlen_attention: unknown backend {backend!r}")
    out, _ = ALL_ATTENTION_FUNCTIONS[backend](_CAUSAL, query, key, value, None, dropout=0.0, scaling=scaling,
                                 sliding_window=window, softcap=softcap,
                                 cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens)
    # contiguous, as register_fake promises; every backend's output is a new tensor (a custom op
    # may not return an alias of its inputs)
    return out.contiguous()


@torch.library.custom_op("packtrain::varlen_attention", mutates_args=())
def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     cu_seqlens: torch.Tensor, backend: str, scaling: float,
                     window: int | None, softcap: float | None) -> torch.Tensor:
    """Causal attention inside each sample of one packed row: q [1, Hq, T, D], k/v [1, Hkv, T, D],
    cu_seqlens [n + 1]; returns [1, T, Hq, D] (as transformers' attention functions do)."""
    return _run(query, key, value, cu_seqlens, backend, scaling, window, softcap)


@varlen_attention.register_fake
def _(query, key, value, cu_seqlens, backend, scaling, window, softcap):
    return query.new_empty((query.shape[0], query.shape[2], query.shape[1], value.shape[3]))


@torch.library.custom_op("packtrain::varlen_attention_backward", mutates_args=())
def varlen_attention_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, cu_seqlens: torch.Tensor, backend: str,
                              scaling: float, window: int | None, softcap: float | None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of varlen_attention w.r.t. q, k, v: the forward recomputed under autograd."""
    with _autograd_on(), torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (query, key, value))
        out = _run(q, k, v, cu_seqlens, backend, scaling, window, softcap)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return tuple(g.contiguous() for g in grads)


def _autograd_on() -> torch._C._ForceDispatchKeyGuard:
    """A custom op's kernel runs below the autograd dispatch keys (excluded in thread-local state),
    where even enable_grad records nothing: put them back for the recomputation (as torch's own
    invoke_leaf_function does), keeping every other key as it is."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for k in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor,
              keys.ADInplaceOrView):
        exclude = exclude.remove(k)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


@varlen_attention_backward.register_fake
def _(grad_out, query, key, value, cu_seqlens, backend, scaling, window, softcap):
    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape))


def _setup_context(ctx, inputs, output):
    query, key, value, cu_seqlens, *rest = inputs
    ctx.save_for_backward(query, key, value, cu_seqlens)
    ctx.rest = rest


def _backward(ctx, grad_out):
    query, key, value, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = varlen_attention_backward(grad_out, query, key, value, cu_seqlens, *ctx.rest)
    return dq, dk, dv, None, None, None, None, None


varlen_attention.register_autograd(_backward, setup_context=_setup_context)


def _op_attention(backend: str):
    """The AttentionInterface function of `backend`'s op form (traceable: checks, then the op)."""

    def attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                  scaling: float | None = None, sliding_window: int | None = None,
                  softcap: float | None = None, **kwargs):
        name = backend + OP_SUFFIX
        if dropout > 0.0:
            raise AttentionBackendError(
                f"{name}: attention dropout ({dropout}) cannot be recomputed exactly in the "
                "compiled backward; set the model's attention_dropout to 0 or train without --compile")
        refuse_unsupported(name, module, {**kwargs, "softcap": softcap}, softcap_ok=True)
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:
            raise AttentionBackendError(f"{name}: no cu_seq_lens_q: call the model with "
                                        "**packed_forward_kwargs(cu_seqlens, position_ids)")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        out = varlen_attention(query, key, value, cu, backend, float(scaling), sliding_window,
                               None if softcap is None else float(softcap))
        return out, None

    return attention


def enable_compiled_attention(model, backend: str) -> str:
    """Switch `model` from packtrain backend `backend` (a registered name such as packtrain_sdpa)
    to its custom-op form; returns the name now set."""
    if backend not in BACKEND_NAMES:
        raise AttentionBackendError(f"--compile needs one of the packtrain attention backends "
                                    f"{', '.join(BACKEND_NAMES)}; got {backend!r}")
    name = backend + OP_SUFFIX
    AttentionInterface.register(name, _op_attention(backend))
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(name, no_mask)
    base = unwrap_model(model)
    base.set_attn_implementation(name)
    if base.config._attn_implementation != name:
        raise AttentionBackendError(f"{type(base).__name__} refused attention implementation {name!r}")
    return name
