"""Sequence parallelism (Ulysses) over packs: `train-run --sequence-parallel N`.

The job
-------
The world is split into groups of N consecutive ranks (sequence-parallel groups); group g holds
ranks g*N .. g*N+N-1 and is data-parallel rank g of W/N. Every rank of a group reads the same
micro-batches (the data stream runs with rank = rank // N, world size = W / N), and keeps its own
contiguous piece of each packed row:

    rank r of the group: tokens [r * L, (r + 1) * L),   L = T' / N

where T' is the row length rounded up to a multiple of N. A row whose length does not divide by N
gets T' - T (< N) padding tokens appended as one extra *padding sample* (token id 0, label -100,
positions 0, 1, ...; cu_seqlens gains one entry), so cu_seqlens and position_ids stay valid and
the padding attends only to itself: it changes no real token's output and carries no loss.

Attention (`_ulysses`, wrapped around the packtrain varlen backend): q/k/v of the local piece,
[1, H, L, D], go through an all-to-all that scatters heads and gathers the sequence, giving
[1, H/N, T', D]: the whole row for H/N heads. The packtrain backend runs on it with the *whole
row's* cu_seqlens (so attention stays inside each sample exactly as without SP), and a second
all-to-all brings the output back to [1, L, H, D]. Both all-to-alls are differentiable (their
backward is the reverse all-to-all). Key/value heads: when N does not divide num_key_value_heads
but num_key_value_heads divides N (e.g. 1 or 2 KV heads over 4 ranks), each KV head is repeated
N / num_key_value_heads times before the all-to-all; any other layout is refused in one line.

Loss: labels are shifted over the whole row *before* slicing (the target of the last token of a
piece lives at the first token of the next piece), so each rank sums the CE of exactly its
tokens' targets and counts exactly its label tokens. train.loop then needs no change: the step's
label count N_total is the all-reduce of every rank's count, i.e. each token counted once, and
the backward of `loss_sum * grad_accum * W / N_total` on every rank, averaged by DeepSpeed over
all W ranks (ZeRO's data-parallel group is the whole world), sums the group's partial gradients:

    (1/W) * sum over ranks of (ga * W / N_total) * d(loss_sum_rank)/(ga * dθ) = d(sum CE)/dθ / N_total

ZeRO 1-3 therefore partition over all W ranks, as without SP.

Not supported (refused in one line): mixtures of datasets (their per-dataset counters read whole
rows), a world size not divisible by N. Evaluation (train.evaluate) slices its rows
the same way.
Resuming with another N works: the data order depends only on the data-parallel world size W/N,
micro-batch and accumulation (the saved position is global), and ZeRO's checkpoint on W.
With N = 1 nothing here runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from pack.errors import PacktrainError
from pack.format import IGNORE_INDEX
from train.data import MicroBatch

__all__ = ["SPGroup", "SeqSlice", "setup_sequence_parallel", "enable_ulysses", "shard_stream",
           "slice_micro_batch", "slice_loss", "slice_segment_logps"]


@dataclass
class SPGroup:
    size: int           # N: ranks per sequence-parallel group
    rank: int           # this rank's place in its group (which piece of the row it keeps)
    dp_rank: int        # the group's data-parallel rank
    dp_size: int        # W / N
    group: Any = None   # the torch.distributed process group of this rank's SP group


@dataclass
class SeqSlice(MicroBatch):
    """This rank's piece of a packed row. `labels` is [1, L + 1]: labels[0, t + 1] is the target of
    local token t (already shifted over the whole row), so count_label_tokens counts this piece's
    label tokens; `cu_seqlens`/`max_seqlen` describe the whole (padded) row."""

    real_tokens: int = 0  # tokens of the piece that are not padding

    @property
    def num_tokens(self) -> int:
        return self.real_tokens



# ---------------------------------------------------------------- set-up

def setup_sequence_parallel(args: Any, world_size: int, rank: int) -> SPGroup | None:
    """Check --sequence-parallel against the run and create the process groups (every rank must
    call this: new_group is collective). None when N = 1."""
    n = int(getattr(args, "sequence_parallel", 1) or 1)
    if n == 1:
        return None
    if world_size % n:
        raise PacktrainError(f"--sequence-parallel {n}: the world size {world_size} is not a "
                             f"multiple of it; launch a multiple of {n} ranks (--nproc)")
    if getattr(args, "shards_list", None) and len(args.shards_list) > 1:
        raise PacktrainError(f"--sequence-parallel {n}: not supported with a mixture of datasets "
                             f"(several --shards); train on one dataset or use "
                             f"--sequence-parallel 1")
    mine = None
    for g in range(world_size // n):
        group = tdist.new_group(list(range(g * n, (g + 1) * n)))
        if g == rank // n:
            mine = group
    return SPGroup(n, rank % n, rank // n, world_size // n, mine)


def _head_counts(model: Any) -> tuple[int, int]:
    from train.attention import unwrap_model

    cfg = unwrap_model(model).config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = int(cfg.num_attention_heads)
    return heads, int(getattr(cfg, "num_key_value_heads", None) or heads)


def kv_repeat(heads: int, kv_heads: int, n: int) -> int:
    """How many times each KV head is repeated before the all-to-all (1: none); refuses layouts
    the head scatter cannot split in one line."""
    if heads % n:
        raise PacktrainError(f"--sequence-parallel {n}: the model's num_attention_heads {heads} "
                             f"is not a multiple of it; choose N dividing {heads}")
    if kv_heads % n == 0:
        return 1
    if n % kv_heads == 0:
        return n // kv_heads
    raise PacktrainError(f"--sequence-parallel {n}: the model's num_key_value_heads {kv_heads} "
                         f"neither divides by nor divides {n}; choose N dividing {kv_heads} or "
                         f"a multiple of it")


def enable_ulysses(model: Any, backend: str, sp: SPGroup) -> str:
    """Switch `model` (packtrain `backend` already enabled) to the Ulysses wrapper around that
    backend; returns the registered name."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from train.attention import AttentionMaskInterface, BACKEND_NAMES, unwrap_model

    if backend not in BACKEND_NAMES:
        raise PacktrainError(f"--sequence-parallel {sp.size}: needs a packtrain varlen attention "
                             f"backend (--attn sdpa|torch|flash), not {backend!r}")
    heads, kv_heads = _head_counts(model)
    rep = kv_repeat(heads, kv_heads, sp.size)
    inner = ALL_ATTENTION_FUNCTIONS[backend]

    def ulysses(module, query, key, value, attention_mask, **kwargs):
        return _ulysses(inner, sp, rep, module, query, key, value, attention_mask, **kwargs)

    name = f"{backend}_ulysses"
    AttentionInterface.register(name, ulysses)
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(name, _no_mask)  # boundaries come from cu_seqlens
    base = unwrap_model(model)
    base.set_attn_implementation(name)
    if base.config._attn_implementation != name:
        raise PacktrainError(f"{type(base).__name__} refused attention implementation {name!r}")
    return name


def _no_mask(*args, **kwargs):
    return None


# ---------------------------------------------------------------- the all-to-alls

class _AllToAll(torch.autograd.Function):
    """x [N, ...]: part j goes to rank j of the group, part j of the result came from rank j.
    Its own inverse, so the backward is the same exchange of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()  # before empty_like, which would copy a view's strides
        out = torch.empty_like(x)
        tdist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        tdist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def seq_to_heads(x: torch.Tensor, sp: SPGroup) -> torch.Tensor:
    """[1, H, L, D] (this rank's piece, all heads) -> [1, H/N, N*L, D] (whole row, its heads)."""
    n = sp.size
    _, h, length, d = x.shape
    y = _AllToAll.apply(x[0].reshape(n, h // n, length, d), sp.group)  # [src piece, H/N, L, D]
    return y.transpose(0, 1).reshape(1, h // n, n * length, d)


def heads_to_seq(o: torch.Tensor, sp: SPGroup) -> torch.Tensor:
    """[1, N*L, H/N, D] (whole row, this rank's heads) -> [1, L, H, D] (its piece, all heads)."""
    n = sp.size
    _, t, hn, d = o.shape
    y = _AllToAll.apply(o[0].reshape(n, t // n, hn, d), sp.group)  # [src heads, L, H/N, D]
    return y.transpose(0, 1).reshape(1, t // n, n * hn, d)


def _ulysses(inner, sp: SPGroup, rep: int, module, query, key, value, attention_mask, **kwargs):
    if rep > 1:  # fewer KV heads than ranks: each rank needs a whole KV head
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    q, k, v = (seq_to_heads(t, sp) for t in (query, key, value))
    kwargs.pop("position_ids", None)  # this piece's; the boundaries come from the whole row's cu
    out, _ = inner(module, q, k, v, attention_mask, **kwargs)
    return heads_to_seq(out, sp), None


# ---------------------------------------------------------------- data and loss

def slice_micro_batch(mb: MicroBatch, sp: SPGroup) -> SeqSlice:
    """This rank's piece of `mb` (padded to a multiple of N with one padding sample)."""
    from train.loss import shift_labels

    if mb.token_groups is not None:
        raise PacktrainError("--sequence-parallel: mixtures of datasets are not supported")
    n, total = sp.size, mb.num_tokens
    pad = (-total) % n
    ids, pos, cu = mb.input_ids, mb.position_ids, mb.cu_seqlens
    targets = shift_labels(mb.labels, cu)
    if pad:
        ids = torch.cat([ids, ids.new_zeros(1, pad)], dim=1)
        pos = torch.cat([pos, torch.arange(pad, dtype=pos.dtype).unsqueeze(0)], dim=1)
        targets = torch.cat([targets, targets.new_full((pad,), IGNORE_INDEX)])
        cu = torch.cat([cu, cu.new_tensor([total + pad])])
    length = (total + pad) // n
    s, e = sp.rank * length, (sp.rank + 1) * length
    labels = torch.cat([targets.new_full((1,), IGNORE_INDEX), targets[s:e]]).unsqueeze(0)
    # counted here, on the host: the step reads nothing back for it (train.loop)
    n_labels = int((labels[:, 1:] != IGNORE_INDEX).sum())
    bounds = None if mb.bounds is None else mb.bounds + ([total + pad] if pad else [])
    return SeqSlice(ids[:, s:e].contiguous(), labels, pos[:, s:e].contiguous(), cu,
                    max(mb.max_seqlen, pad), mb.pack_ids, bounds=bounds, label_tokens=n_labels,
                    pairs=mb.pairs, segment_labels=mb.segment_labels, ref_logps=mb.ref_logps,
                    real_tokens=max(0, min(e, total) - s))


def shard_stream(stream: Any, sp: SPGroup) -> Any:
    """Make `stream` hand this rank its piece of its SP group's micro-batches: the group shares
    one data-parallel rank."""
    stream.rank, stream.world_size = sp.dp_rank, sp.dp_size
    whole = stream.micro_batch_of
    stream.micro_batch_of = lambda ids: slice_micro_batch(whole(ids), sp)
    return stream


def _slice_hidden(model: Any, mb: SeqSlice) -> tuple[Any, torch.Tensor]:
    """(the model's parts, hidden states of the piece [L + 1, H]): the decoder on the piece with
    the whole row's boundaries, plus one zero row so that the loss's own shift maps
    labels[t + 1] onto local token t."""
    from train.loss import model_hidden_and_head

    parts = model_hidden_and_head(model)
    cu = mb.cu_seqlens.to(torch.int32)
    out = parts.decoder(input_ids=mb.input_ids, position_ids=mb.position_ids,
                        cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=mb.max_seqlen,
                        max_length_k=mb.max_seqlen, use_cache=False, attention_mask=None)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return parts, torch.cat([hidden[0], hidden.new_zeros(1, hidden.shape[-1])])


class _SumForwardOnly(torch.autograd.Function):
    """All-reduce (sum) over the SP group in forward; the gradient passes through unchanged.
    Every rank of the group computes the same loss from the summed values, so rank r's share of
    the gradient is d(loss)/d(sum) times its own partial sum's: the group's ranks together
    back-propagate the loss exactly once (DeepSpeed then sums them as for the SFT loss)."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        tdist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def slice_segment_logps(model: Any, mb: SeqSlice, chunk_size: int, sp: SPGroup) -> torch.Tensor:
    """train.preference.segment_logps of the whole row, from this rank's piece: per-token
    log-probs of the piece's label tokens summed per segment, then summed over the group (the
    per-segment sums travel, never logits). [segments of the padded row] float32."""
    from train.data import segment_ids
    from train.loss import head_token_losses

    parts, hidden = _slice_hidden(model, mb)
    token_ce, idx = head_token_losses(parts.head, hidden, mb.labels.reshape(-1), chunk_size,
                                      logit_scale=parts.logit_scale, softcap=parts.softcap,
                                      label_count=mb.label_tokens)
    start = sp.rank * mb.input_ids.shape[1]  # the piece's first position in the row
    seg = segment_ids(mb.bounds)[start:start + hidden.shape[0] - 1].to(hidden.device)
    partial = token_ce.new_zeros(len(mb.bounds) - 1).index_add(0, seg.index_select(0, idx),
                                                               -token_ce)
    return _SumForwardOnly.apply(partial, sp.group)


def slice_loss(model: Any, mb: SeqSlice, chunk_size: int) -> tuple[torch.Tensor, int]:
    """(summed CE over this piece's label tokens, their count): the decoder on the piece with the
    whole row's boundaries, then the chunked CE of the piece's pre-shifted targets."""
    from train.loss import head_cross_entropy

    parts, hidden = _slice_hidden(model, mb)
    return head_cross_entropy(parts.head, hidden, mb.labels.reshape(-1), chunk_size,
                              logit_scale=parts.logit_scale, softcap=parts.softcap)
