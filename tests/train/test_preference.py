"""Preference objectives (train.preference): per-segment log-probs of a packed row equal each
segment run alone, token id 0 is a label like any other, and the DPO / SimPO losses of packed
pairs equal the same pairs run unpacked (loss and gradients, fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from train.attention import enable_packed_attention
from train.preference import pair_losses, segment_label_counts, segment_logps

V = 64


def tiny_llama(seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, tie_word_embeddings=tie))
    enable_packed_attention(model, "packtrain_sdpa")
    return model


def make_pairs(n_pairs: int, seed: int = 0, zero_label: bool = True) -> list[dict]:
    """Preference pairs as segments: a shared prompt, then a chosen / rejected response; labels
    only on the responses. With `zero_label`, token id 0 appears inside every response."""
    g = np.random.default_rng(seed)
    segs = []
    for k in range(n_pairs):
        prompt = g.integers(1, V, int(g.integers(2, 6)))
        for role in (0, 1):
            resp = g.integers(1, V, int(g.integers(2, 7)))
            if zero_label:
                resp[len(resp) // 2] = 0
            ids = np.concatenate([prompt, resp])
            labels = np.concatenate([np.full(len(prompt), -100), resp])
            segs.append({"ids": ids, "labels": labels, "pair": k, "role": role})
    return segs


def as_row(segs: list[dict]):
    ids = torch.from_numpy(np.concatenate([s["ids"] for s in segs])).long().unsqueeze(0)
    labels = torch.from_numpy(np.concatenate([s["labels"] for s in segs])).long().unsqueeze(0)
    lengths = [len(s["ids"]) for s in segs]
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return ids, labels, pos, torch.tensor(bounds, dtype=torch.int32), bounds


def naive_logp(model, ids, labels) -> torch.Tensor:
    """Full logits of one segment alone, log_softmax, summed over its label positions."""
    logits = model(input_ids=ids.reshape(1, -1), use_cache=False).logits[0].float()
    lp = F.log_softmax(logits[:-1], -1)
    tgt = labels.reshape(-1)[1:]
    keep = tgt != -100
    return lp[keep].gather(1, tgt[keep][:, None]).sum()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_packed_segments_equal_each_alone(tie):
    """A pack of several pairs: the same per-segment log-probs (and gradients of any weighting
    of them) as each segment run alone, fp32, 1e-5; host facts or none give the same values."""
    model = tiny_llama(tie=tie)
    segs = make_pairs(4)
    ids, labels, pos, cu, bounds = as_row(segs)
    n_labels = int((labels[0, 1:] != -100).sum())
    weights = torch.linspace(-1.0, 2.0, len(segs))
    got = segment_logps(model, ids, labels, pos, cu, bounds=bounds, chunk_size=5,
                        max_seqlen=max(np.diff(bounds)), label_count=n_labels)
    (got * weights).sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone = torch.stack([naive_logp(model, torch.from_numpy(s["ids"]), torch.from_numpy(s["labels"]))
                         for s in segs])
    (alone * weights).sum().backward()
    assert got.dtype == torch.float32 and got.shape == (len(segs),)
    assert torch.allclose(got, alone, rtol=1e-5, atol=1e-5), (got, alone)
    for a, b in zip(packed_grads, model.parameters()):
        assert torch.allclose(a, b.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        again = segment_logps(model, ids, labels, pos, cu)  # no host facts: read and checked
    assert torch.allclose(again, got.detach(), rtol=0, atol=1e-6)


def test_token_id_zero_is_a_label():
    """A response token with id 0 is counted: changing its label to -100 changes that segment's
    log-prob by exactly that token's log-prob and the host's count by one."""
    model = tiny_llama()
    segs = make_pairs(2, zero_label=True)
    ids, labels, pos, cu, bounds = as_row(segs)
    zeros = (labels[0] == 0).nonzero().flatten().tolist()
    assert zeros, "the fixture puts token 0 inside every response"
    with torch.no_grad():
        full = segment_logps(model, ids, labels, pos, cu, bounds=bounds)
        masked_labels = labels.clone()
        masked_labels[0, zeros[0]] = -100
        masked = segment_logps(model, ids, masked_labels, pos, cu, bounds=bounds)
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0].float()
    seg = int(np.searchsorted(bounds, zeros[0], side="right") - 1)
    token_lp = F.log_softmax(logits[zeros[0] - 1], -1)[0]
    assert torch.allclose(full[seg] - masked[seg], token_lp, atol=1e-5)
    others = [i for i in range(len(segs)) if i != seg]
    assert torch.equal(full[others], masked[others])
    counts = segment_label_counts(labels[0].numpy(), bounds)
    assert counts.tolist() == [int((s["labels"][1:] != -100).sum()) for s in segs]
    assert segment_label_counts(masked_labels[0].numpy(), bounds)[seg] == counts[seg] - 1


def test_pair_losses_formulas():
    pol = torch.tensor([-3.0, -5.0, -2.0, -1.0])
    ref = torch.tensor([-4.0, -4.0, -2.5, -1.5])
    loss, ch, rj = pair_losses("dpo", pol, ref, None, beta=0.1)
    z = 0.1 * torch.tensor([(-3 + 4) - (-5 + 4), (-2 + 2.5) - (-1 + 1.5)])
    assert torch.allclose(loss, -F.logsigmoid(z))
    assert torch.allclose(ch - rj, z)
    n = torch.tensor([3, 5, 2, 1])
    loss, ch, rj = pair_losses("simpo", pol, None, n, beta=2.0, gamma=0.5)
    z = 2.0 * torch.tensor([-3 / 3 + 5 / 5, -2 / 2 + 1 / 1]) - 0.5
    assert torch.allclose(loss, -F.logsigmoid(z))
