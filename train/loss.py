"""Exact, chunked cross-entropy from hidden states for packed causal-LM training.

A packed row of T tokens with a vocabulary of V would need a [T, V] logits tensor (fp32 for the loss:
a 32k-token pack with Qwen's 152k vocabulary is 20 GB) plus its gradient.  Here logits are only
ever built for ``chunk_size`` label tokens at a time:

* only positions that carry a label (after the shift) are fed to the head at all;
* each chunk computes logits in the compute dtype (as the model's own lm_head would), upcasts to
  fp32, takes logsumexp, and immediately turns the fp32 buffer into the gradient of the summed CE
  with respect to those logits (softmax - one_hot), which is multiplied back into the gradients of
  the hidden states and of the head weight (and bias).  These gradients are kept (hidden: [N, H];
  weight: [V, H], accumulated in fp32, stored in the weight's dtype) and handed to autograd in
  ``backward``, which is then a scalar multiply.  So neither forward nor backward ever holds
  [T, V] logits, and the head matmuls run 3 times (not 4 as with recompute-in-backward).

The value returned is the SUM of per-token losses and the number of label tokens; the trainer
divides by the label-token count of the whole optimizer step (all ranks, all micro-steps).

Shift: as Hugging Face models do, ``hidden[t]`` predicts ``labels[t + 1]``; labels are unshifted and
-100 means "no loss".  With ``cu_seqlens`` the last token of every sample is never asked to predict
the first token of the next sample (even if that label is not -100).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.attention import packed_forward_kwargs, unwrap_model

__all__ = [
    "IGNORE_INDEX",
    "chunked_cross_entropy",
    "shift_labels",
    "CausalLMParts",
    "model_hidden_and_head",
    "head_cross_entropy",
    "head_token_losses",
    "packed_loss",
    "wgrad_accumulation_mode",
]

IGNORE_INDEX = -100
_WGRAD_BLOCK = 16384  # rows of the [V, H] weight gradient updated per matmul (bounds the temporary)


def shift_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """targets[t] = labels[t + 1]; -100 at the last position and, with cu_seqlens, at the last
    position of every sample."""
    labels = labels.reshape(-1)
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:-1] = labels[1:]
    if cu_seqlens is not None:
        ends = torch.as_tensor(cu_seqlens, device=labels.device).reshape(-1)[1:].to(torch.long) - 1
        n = labels.numel()
        if n:
            # out-of-range ends are ignored without a boolean index (data-dependent size: a sync
            # on CUDA): they scatter the dtype's maximum, which the min keeps from winning
            keep = torch.where((ends >= 0) & (ends < n), IGNORE_INDEX, torch.iinfo(targets.dtype).max)
            targets.scatter_reduce_(0, ends.clamp(0, n - 1), keep.to(targets.dtype), reduce="amin")
    return targets


def _label_positions(targets: torch.Tensor, label_count: int | None) -> tuple[torch.Tensor, int]:
    """(positions of the label tokens, their number). `label_count`, when the host counted them
    (checked packs), sizes the result without a read back from the device; a wrong count fails a
    device-side assert instead of silently dropping or inventing tokens."""
    mask = targets != IGNORE_INDEX
    if label_count is None:
        idx = torch.nonzero(mask).flatten()
        return idx, int(idx.numel())
    torch._assert_async(mask.sum() == label_count,
                        f"the host counted {label_count} label tokens, the loss another number")
    return torch.nonzero_static(mask, size=label_count).flatten(), label_count


_FP32_OUT_ADDMM: dict = {}


def wgrad_accumulation_mode(device: torch.device) -> str:
    """How the [V, H] weight gradient of half-precision chunks is accumulated in fp32 on ``device``:
    'addmm_fp32_out' (one GEMM per chunk, bf16/fp16 inputs, fp32 accumulator read and written by the
    GEMM; needs torch's addmm(out_dtype=float32), CUDA) or 'blocked' (bf16 product per block of
    vocabulary rows, added into the fp32 accumulator). Probed once per device, checked numerically."""
    device = torch.device(device)
    key = (device.type, device.index)
    if key not in _FP32_OUT_ADDMM:
        ok = False
        if device.type == "cuda":
            try:
                g = torch.Generator(device=device).manual_seed(0)
                a = torch.randn(96, 40, device=device, dtype=torch.bfloat16, generator=g)
                b = torch.randn(40, 72, device=device, dtype=torch.bfloat16, generator=g)
                acc = torch.randn(96, 72, device=device, generator=g)
                expect = acc.double() + a.double() @ b.double()
                res = torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                ok = (res.data_ptr() == acc.data_ptr() and acc.dtype == torch.float32
                      and torch.allclose(acc.double(), expect, atol=1e-3, rtol=1e-4))
            except Exception:
                ok = False
        _FP32_OUT_ADDMM[key] = ok
    return "addmm_fp32_out" if _FP32_OUT_ADDMM[key] else "blocked"


def _accumulate_wgrad(acc: torch.Tensor, gt: torch.Tensor, h: torch.Tensor) -> None:
    """acc[V, H] (fp32) += gt[V, C] @ h[C, H]."""
    if gt.dtype == acc.dtype:
        acc.addmm_(gt, h)
    elif gt.dtype == torch.bfloat16 and wgrad_accumulation_mode(acc.device) == "addmm_fp32_out":
        torch.addmm(acc, gt, h, out_dtype=torch.float32, out=acc)
    else:
        # bf16 product of each block (fp32 accumulation inside the GEMM, one rounding), summed in fp32
        for vb in range(0, acc.shape[0], _WGRAD_BLOCK):
            acc[vb:vb + _WGRAD_BLOCK] += torch.mm(gt[vb:vb + _WGRAD_BLOCK], h)


class _ChunkedLinearCE(torch.autograd.Function):
    """sum_i CE(softcap(scale * (h_i W^T + b)), y_i) over rows of h, all y_i valid."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, compute_dtype, logit_scale, softcap, needs,
                groups=None):
        need_h, need_w, need_b = needs
        n = hidden.shape[0]
        vocab = weight.shape[0]
        device = hidden.device
        w = weight if weight.dtype == compute_dtype else weight.to(compute_dtype)
        b = None if bias is None else (bias if bias.dtype == compute_dtype else bias.to(compute_dtype))
        any_grad = need_h or need_w or need_b
        loss = torch.zeros((), dtype=torch.float32, device=device)
        grad_h = torch.empty((n, hidden.shape[1]), dtype=compute_dtype, device=device) if need_h else None
        grad_w = torch.zeros((vocab, weight.shape[1]), dtype=torch.float32, device=device) if need_w else None
        grad_b = torch.zeros((vocab,), dtype=torch.float32, device=device) if need_b else None
        with torch.autocast(device.type, enabled=False):
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                h = hidden[s:e]
                if h.dtype != compute_dtype:
                    h = h.to(compute_dtype)
                t = targets[s:e]
                logits = F.linear(h, w, b).float()
                if logit_scale != 1.0:
                    logits.mul_(logit_scale)
                tanh = None
                if softcap is not None:
                    tanh = torch.tanh(logits.div_(softcap))
                    logits = torch.mul(tanh, softcap, out=logits)
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, t[:, None]).squeeze(1)
                token_loss = lse - picked
                loss += token_loss.sum()
                if groups is not None:  # a mixture's per-dataset sums: bookkeeping, no gradient
                    groups[1].index_add_(0, groups[0][s:e], token_loss.detach().to(groups[1].dtype))
                if not any_grad:
                    continue
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                g[torch.arange(e - s, device=device), t] -= 1.0
                if tanh is not None:
                    g.mul_(1.0 - tanh * tanh)
                if logit_scale != 1.0:
                    g.mul_(logit_scale)
                if need_b:
                    grad_b += g.sum(0)
                g = g.to(compute_dtype)
                if need_h:
                    torch.mm(g, w, out=grad_h[s:e])
                if need_w:
                    _accumulate_wgrad(grad_w, g.t(), h)
                del g, logits
        # Kept on ctx (not save_for_backward): backward scales them in place and drops them, so no
        # second [V, H] copy exists at the start of backward, when activation memory peaks.
        ctx.grads = [
            grad_h.to(hidden.dtype) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
        ]
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("chunked_cross_entropy: backward through the same loss twice is not supported "
                               "(its gradients are computed in forward and released by the first backward)")
        ctx.grads = None
        out = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        return out[0], out[1], out[2], None, None, None, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
    label_count: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of ``hidden`` [T, H] under the head ``lm_head_weight`` [V, H]
    (+ ``bias`` [V]) against unshifted ``labels`` [T] (-100 ignored), without materialising [T, V].

    Returns (loss_sum: fp32 scalar tensor, n_label_tokens: int). Logits are
    ``softcap * tanh(scale * (h W^T + b) / softcap)`` when those are given (Gemma/Cohere/Granite style
    heads), computed in the weight's dtype (or the autocast dtype when autocast is on), CE in fp32.
    Gradients w.r.t. hidden, weight and bias equal those of the naive full-logits computation.
    ``groups`` = (group of every position [T] int64, sums [K]): the CE of each label token is also
    added (without gradient) to ``sums`` at its position's group (a mixture's per-dataset loss).
    ``label_count``: the label tokens as counted on the host from checked packs (labels in range):
    then nothing is read back from the device (no count, no range check).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if hidden.dim() == 3:
        if hidden.shape[0] != 1:
            raise ValueError(f"hidden must be [T, H] or [1, T, H]; got {tuple(hidden.shape)}")
        hidden = hidden[0]
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H] or [1, T, H]; got {tuple(hidden.shape)}")
    labels = labels.reshape(-1)
    if labels.numel() != hidden.shape[0]:
        raise ValueError(f"labels ({labels.numel()}) and hidden ({hidden.shape[0]}) lengths differ")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"lm_head_weight must be [V, {hidden.shape[1]}]; got {tuple(lm_head_weight.shape)} (under ZeRO-3 call "
            "head_cross_entropy(head_module, ...) so the weight is gathered)"
        )
    targets = shift_labels(labels.to(hidden.device), cu_seqlens)
    idx, n = _label_positions(targets, label_count)
    sel_t = targets.index_select(0, idx).to(torch.long)
    vocab = lm_head_weight.shape[0]
    if n and label_count is None and (int(sel_t.min()) < 0 or int(sel_t.max()) >= vocab):
        raise ValueError(
            f"labels must be -100 or in [0, {vocab}); got values in [{int(sel_t.min())}, {int(sel_t.max())}]"
        )
    sel_h = hidden.index_select(0, idx)
    sel_g = None if groups is None else (_group_of(groups[0], idx), groups[1])
    dev = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else lm_head_weight.dtype
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and lm_head_weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    loss = _ChunkedLinearCE.apply(
        sel_h,
        lm_head_weight,
        bias,
        sel_t,
        int(chunk_size),
        compute_dtype,
        1.0 if logit_scale is None else float(logit_scale),
        None if softcap is None else float(softcap),
        needs,
        sel_g,
    )
    return loss, n


# --------------------------------------------------------------------------------------------------
# Model plumbing: decoder + head, robust to peft wrappers, tied embeddings and ZeRO-3
# --------------------------------------------------------------------------------------------------


@dataclass
class CausalLMParts:
    """The pieces of a causal LM that packed_loss needs."""

    model: nn.Module  # the transformers *ForCausalLM (inside any peft wrapper)
    decoder: nn.Module  # returns the final (normed) hidden states, e.g. LlamaModel
    head: nn.Module  # the output projection (get_output_embeddings()); weight may be tied to the embedding
    logit_scale: float | None = None
    softcap: float | None = None


def model_hidden_and_head(model: nn.Module) -> CausalLMParts:
    """Find the decoder (hidden states) and the output head of a causal LM: a transformers
    *ForCausalLM, possibly inside peft's PeftModel or a DeepSpeed/DDP wrapper. Works for tied
    embeddings (the head's weight is then the embedding matrix). Reads Gemma-style
    ``final_logit_softcapping``, Cohere ``logit_scale`` and Granite ``logits_scaling`` from the config."""
    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (not a causal LM head model)")
    decoder = None
    prefix = getattr(base, "base_model_prefix", None)
    if prefix and isinstance(getattr(base, prefix, None), nn.Module):
        decoder = getattr(base, prefix)
    elif hasattr(base, "get_decoder"):
        decoder = base.get_decoder()
    if decoder is None or decoder is base:
        raise ValueError(f"cannot find the decoder of {type(base).__name__} (tried base_model_prefix and get_decoder())")
    cfg = getattr(base, "config", None)
    scale = None
    softcap = None
    if cfg is not None:
        softcap = getattr(cfg, "final_logit_softcapping", None)
        if getattr(cfg, "logit_scale", None) is not None:
            scale = float(cfg.logit_scale)
        if getattr(cfg, "logits_scaling", None) not in (None, 1, 1.0):
            scale = (scale or 1.0) / float(cfg.logits_scaling)
    return CausalLMParts(base, decoder, head, scale, softcap)


def _is_plain_linear(head: nn.Module) -> bool:
    """nn.Linear (or a subclass whose forward is a plain linear), not a peft/adapter wrapper."""
    return isinstance(head, nn.Linear) and not hasattr(head, "base_layer") and type(head).forward is nn.Linear.forward


def _group_of(token_groups: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The group of each selected position (`idx` into the row)."""
    return token_groups.reshape(-1).to(idx.device).index_select(0, idx)


def _chunk_ce_generic(head, h, t, logit_scale, softcap, reduction="sum"):
    logits = head(h).float()
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, t, reduction=reduction)


def head_cross_entropy(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    cu_seqlens: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
    label_count: int | None = None,
) -> tuple[torch.Tensor, int]:
    """chunked_cross_entropy through a head *module*: the computation runs inside ``head(...)`` so
    that module hooks fire (DeepSpeed ZeRO-3 gathers a partitioned weight in its pre-forward hook and
    handles the gradient as for the module's own forward). A head that is not a plain nn.Linear (a peft
    LoRA layer, modules_to_save wrapper, ...) is called per chunk under activation checkpointing, so
    its [chunk, V] logits are recomputed in backward instead of kept."""
    if _is_plain_linear(head):
        result = {}

        def forward(h):
            loss, n = chunked_cross_entropy(
                h, head.weight, labels, chunk_size, bias=head.bias, logit_scale=logit_scale, softcap=softcap,
                cu_seqlens=cu_seqlens, groups=groups, label_count=label_count,
            )
            result["n"] = n
            return loss

        had = "forward" in head.__dict__
        old = head.__dict__.get("forward")
        head.forward = forward  # instance attribute: nn.Module.__call__ runs hooks, then self.forward
        try:
            loss = head(hidden)
        finally:
            if had:
                head.forward = old
            else:
                del head.forward
        return loss, result["n"]

    token_ce, idx = head_token_losses(head, hidden, labels, chunk_size, cu_seqlens=cu_seqlens,
                                      logit_scale=logit_scale, softcap=softcap,
                                      label_count=label_count)
    if groups is not None:
        groups[1].index_add_(0, _group_of(groups[0], idx), token_ce.detach().to(groups[1].dtype))
    return token_ce.sum(), idx.numel()


def head_token_losses(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    cu_seqlens: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    label_count: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE of every label token [n] fp32, with gradient; their positions in the row [n]) through
    the head module, ``chunk_size`` tokens at a time under activation checkpointing: only one
    chunk's [chunk, V] logits exist at once, in forward and again in backward (recomputed).
    Unlike chunked_cross_entropy the result is per token, so any weighting of the tokens (a
    mixture's, a preference loss's per-segment sums) back-propagates exactly."""
    from torch.utils.checkpoint import checkpoint

    if hidden.dim() == 3:
        hidden = hidden[0]
    targets = shift_labels(labels.to(hidden.device), cu_seqlens)
    idx, n = _label_positions(targets, label_count)
    sel_h = hidden.index_select(0, idx)
    sel_t = targets.index_select(0, idx).to(torch.long)
    pieces = [checkpoint(_chunk_ce_generic, head, sel_h[s:s + chunk_size],
                         sel_t[s:s + chunk_size], logit_scale, softcap, "none",
                         use_reentrant=False) for s in range(0, n, chunk_size)]
    if not pieces:  # keeps the graph connected: an empty, differentiable result
        return (sel_h.sum(-1) * 0.0).float(), idx
    return torch.cat(pieces).float(), idx


def packed_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    chunk_size: int = 1024,
    max_length: int | None = None,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
    bounds: list[int] | None = None,
    label_count: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Run ``model`` (attention already switched with enable_packed_attention) on one packed row and
    return (sum of next-token CE over label tokens as an fp32 scalar, number of label tokens).

    input_ids/labels/position_ids: [T] or [1, T]; cu_seqlens: [n_samples + 1]. Passes use_cache=False,
    attention_mask=None and the cu_seqlens kwargs; hidden states come from the decoder so full logits
    are never built. The caller divides by the label-token count of the whole optimizer step.
    ``groups``: see chunked_cross_entropy (per-dataset sums of a mixture). ``bounds`` (cu_seqlens
    as ints) and ``label_count``: known on the host from checked packs; the row is then not
    validated again and nothing is read back from the device (train.loop's step).
    """
    parts = model_hidden_and_head(model)
    ids = input_ids.reshape(1, -1)
    kwargs = packed_forward_kwargs(cu_seqlens, position_ids.to(ids.device), max_length=max_length,
                                   bounds=bounds)
    out = parts.decoder(input_ids=ids, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return head_cross_entropy(
        parts.head, hidden[0], labels.reshape(-1), chunk_size, cu_seqlens=kwargs["cu_seq_lens_q"],
        logit_scale=parts.logit_scale, softcap=parts.softcap, groups=groups, label_count=label_count,
    )
