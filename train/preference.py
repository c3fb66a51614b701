"""Preference objectives over packed pairs (format 2.1, ``kind: preference``): per-segment
log-probabilities and the DPO / SimPO losses built on them.

A preference pack holds whole pairs: segment 2k is the chosen and 2k + 1 the rejected response of
one pair (same prompt; labels only on the response). `segment_logps` runs the model once over the
packed row (varlen attention: every segment sees only itself) and returns, per segment,

    logp(segment) = sum over its label positions t of log p(input_ids[t] | the segment before t)

from per-token log-probs of a chunked head (train.loss.head_token_losses: never [T, V] logits in
fp32 at once), summed by segment with an index_add (differentiable). Token id 0 is an ordinary
label: only -100 means "no loss".

Losses per pair i (pc/pr: policy log-probs of chosen/rejected, rc/rr: the reference's, constants;
|c|, |r|: label tokens of each segment, counted on the host):

    dpo    -logsigmoid(beta * ((pc - rc) - (pr - rr)))          rewards beta*(pc-rc), beta*(pr-rr)
    simpo  -logsigmoid(beta * (pc/|c| - pr/|r|) - gamma)        rewards beta*pc/|c|, beta*pr/|r|

The step's loss is the mean over every pair of the optimizer step (all ranks, all micro-steps);
train.loop scales each micro-step's summed pair loss like the SFT path scales its summed CE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pack.errors import PacktrainError

__all__ = ["OBJECTIVES", "DEFAULT_BETA", "DEFAULT_SIMPO_GAMMA", "segment_logps",
           "pair_losses", "Preference", "STATS", "policy_logps", "pair_step", "pair_metrics"]

OBJECTIVES = ("sft", "dpo", "simpo")
# DPO: beta 0.1 (Rafailov et al. 2023; TRL's DPOConfig). SimPO: beta 2.0 (the SimPO paper used
# 2.0-2.5; torchtune's SimPOLoss default) and gamma 0.5, an absolute margin as in TRL's CPOTrainer
# (loss_type="simpo": -logsigmoid(beta * delta - simpo_gamma), simpo_gamma default 0.5).
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0}
DEFAULT_SIMPO_GAMMA = 0.5


def segment_logps(model: Any, input_ids: torch.Tensor, labels: torch.Tensor,
                  position_ids: torch.Tensor, cu_seqlens: torch.Tensor, *,
                  bounds: list[int] | None = None, max_seqlen: int | None = None,
                  chunk_size: int = 1024, label_count: int | None = None) -> torch.Tensor:
    """Per-segment summed log-probs of the labels of one packed row: [n_segments] float32, with
    gradient when grad is enabled. `model`: a causal LM (any peft/DeepSpeed wrapper) whose
    attention was switched with train.attention.enable_packed_attention. `bounds`/`max_seqlen`/
    `label_count`: host facts of checked packs (train.data.collate); then nothing is read back
    from the device. Without `bounds` cu_seqlens is read once (and validated)."""
    from train.attention import packed_forward_kwargs
    from train.data import segment_ids
    from train.loss import head_token_losses, model_hidden_and_head

    parts = model_hidden_and_head(model)
    ids = input_ids.reshape(1, -1)
    if bounds is None:
        bounds = [int(x) for x in torch.as_tensor(cu_seqlens).reshape(-1).tolist()]
    kwargs = packed_forward_kwargs(cu_seqlens, position_ids.reshape(1, -1).to(ids.device),
                                   max_length=max_seqlen, bounds=bounds)
    out = parts.decoder(input_ids=ids, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    token_ce, idx = head_token_losses(parts.head, hidden[0], labels.reshape(-1), chunk_size,
                                      cu_seqlens=kwargs["cu_seq_lens_q"],
                                      logit_scale=parts.logit_scale, softcap=parts.softcap,
                                      label_count=label_count)
    seg = segment_ids(bounds).to(hidden.device, non_blocking=True).index_select(0, idx)
    return token_ce.new_zeros(len(bounds) - 1).index_add(0, seg, -token_ce)


def pair_losses(objective: str, policy: torch.Tensor, reference: torch.Tensor | None,
                lengths: torch.Tensor | None, beta: float, gamma: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [P], chosen reward [P], rejected reward [P]) of P pairs from per-segment log-probs
    `policy` [2P] (chosen, rejected alternating), `reference` [2P] (dpo; constants) and the
    segments' label-token counts `lengths` [2P] (simpo). The rewards carry no gradient.
    Computed in float64: a log-prob sum of a long response is large, and the DPO margin is a
    small difference of such sums (stored references are float64); the loss returns as fp32."""
    pol = policy.double()
    pc, pr = pol[0::2], pol[1::2]
    if objective == "dpo":
        ref = reference.to(pol.dtype).detach()
        chosen, rejected = pc - ref[0::2], pr - ref[1::2]
        logits = beta * (chosen - rejected)
    elif objective == "simpo":
        n = lengths.to(pol.dtype).clamp(min=1)
        chosen, rejected = pc / n[0::2], pr / n[1::2]
        logits = beta * (chosen - rejected) - gamma
    else:
        raise ValueError(f"unknown preference objective {objective!r}")
    return (-F.logsigmoid(logits)).float(), (beta * chosen).detach(), (beta * rejected).detach()


# ---------------------------------------------------------------- the run's objective

@dataclass
class Preference:
    """A preference run's objective and where its reference log-probs come from:
    'stored' (pack-ref's sidecar, on each micro-batch), 'adapter' (the frozen base under LoRA:
    the adapters disabled), 'model' (`ref_model`, a frozen copy), or 'none' (SimPO)."""

    objective: str
    beta: float
    gamma: float = 0.0
    reference: str = "none"
    ref_path: str = ""      # 'model': the reference model's directory
    ref_model: Any = None
    ref_engine: Any = None  # ZeRO-3: the DeepSpeed engine that partitions ref_model
    train_entry: Any = None  # 'stored': the training set's manifest entry (pack.reference)
    eval_entry: Any = None  # 'stored': the eval set's

    def reference_logps(self, model: Any, mb: Any, chunk_size: int,
                        sp: Any) -> torch.Tensor | None:
        """The reference's per-segment log-probs of `mb` (constants), or None (SimPO)."""
        if self.reference == "none":
            return None
        if self.reference == "stored":
            if mb.ref_logps is None:
                raise PacktrainError(f"packs {mb.pack_ids}: no stored reference log-probs "
                                     f"(the reader was not attached); rerun pack-ref")
            return mb.ref_logps
        with torch.no_grad():
            if self.reference == "adapter":
                with model.disable_adapter():
                    return policy_logps(model, mb, chunk_size, sp)
            return policy_logps(self.ref_model, mb, chunk_size, sp)


METRIC_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin",
                "rewards/accuracy", "logps/chosen", "logps/rejected")
# the per-micro-batch sums of a preference step, in this order (all reduced with the loss)
STATS = ("loss", "rewards_chosen", "rewards_rejected", "correct", "logps_chosen",
         "logps_rejected")


def policy_logps(model: Any, mb: Any, chunk_size: int, sp: Any) -> torch.Tensor:
    """Per-segment log-probs of the pairs of `mb` under `model` (this rank's piece under
    --sequence-parallel, summed over the group): [2 * pairs]."""
    if sp is not None:
        from train.sequence_parallel import slice_segment_logps

        out = slice_segment_logps(model, mb, chunk_size, sp)
    else:
        out = segment_logps(model, mb.input_ids, mb.labels, mb.position_ids, mb.cu_seqlens,
                            bounds=mb.bounds, max_seqlen=mb.max_seqlen, chunk_size=chunk_size,
                            label_count=mb.label_tokens)
    return out[:2 * mb.pairs]  # a sequence-parallel padding segment carries no pair


def pair_step(model: Any, mb: Any, chunk_size: int, pref: Preference,
              sp: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed pair loss of `mb`, with gradient; its STATS sums, float64, no gradient). The
    reference runs first, without gradient; its values enter the loss as constants."""
    ref = pref.reference_logps(model, mb, chunk_size, sp)
    pol = policy_logps(model, mb, chunk_size, sp)
    lengths = None if mb.segment_labels is None else mb.segment_labels[:2 * mb.pairs]
    losses, chosen, rejected = pair_losses(pref.objective, pol, ref, lengths, pref.beta,
                                           pref.gamma)
    p = pol.detach()
    stats = torch.stack([losses.detach().sum(), chosen.sum(), rejected.sum(),
                         (chosen > rejected).sum().to(chosen.dtype), p[0::2].sum(),
                         p[1::2].sum()]).double()
    return losses.sum(), stats


def pair_metrics(sums: list[float], pairs: float, prefix: str = "") -> dict:
    """Means over the pairs from the STATS sums: loss, rewards (chosen, rejected, margin),
    accuracy (share of pairs whose chosen reward is higher), log-probs (TRL's names)."""
    s = dict(zip(STATS, sums))
    if not pairs:  # no pairs: no means (metrics.jsonl stays JSON)
        return {f"{prefix}{k}": None for k in METRIC_NAMES} | {f"{prefix}pairs": 0}
    n = float(pairs)
    return {f"{prefix}loss": s["loss"] / n,
            f"{prefix}rewards/chosen": s["rewards_chosen"] / n,
            f"{prefix}rewards/rejected": s["rewards_rejected"] / n,
            f"{prefix}rewards/margin": (s["rewards_chosen"] - s["rewards_rejected"]) / n,
            f"{prefix}rewards/accuracy": s["correct"] / n,
            f"{prefix}logps/chosen": s["logps_chosen"] / n,
            f"{prefix}logps/rejected": s["logps_rejected"] / n,
            f"{prefix}pairs": int(pairs)}
