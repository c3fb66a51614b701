"""Fixed costs out of the training step: host reads (device syncs on CUDA) of the steady-state
step counted on CPU (train.syncs), the one-ahead device copies (train.prefetch), the fused
optimizer choice (train.setup.make_optimizer)."""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch

from test_loop import train_args

# The documented minimum per optimizer step (train.loop.train_step), --grad-accum 2:
#   packtrain     1  the step's one batched read (loss sum, counts, gradient norm)
#   transformers  1 per micro-batch: masking_utils.find_packed_sequence_indices reads whether
#                 position_ids hold several samples, although our backends build no mask
#   deepspeed     ZeRO 2 only: 3 bool() in is_invalid_grad_norm (its overflow checks)
EXPECTED = {0: {"packtrain": 1, "transformers": 2}, 2: {"packtrain": 1, "transformers": 2, "deepspeed": 3}}


@pytest.mark.parametrize("zero", [0, 2])
def test_step_sync_count(inproc, dataset, model_dir, tmp_path, zero):
    """Steady state (after step 1): packtrain reads the device once per step, at ZeRO 0 fp32
    (before the update) and ZeRO 2 (after it); the step's results are unchanged by counting."""
    from train.loop import train_step
    from train.setup import build
    from train.syncs import count_syncs

    run = build(train_args(dataset, model_dir, tmp_path / "o", "--zero", str(zero),
                           "--grad-accum", "2"), inproc)
    train_step(run, run.stream.next_step()[0])  # step 1: first-call work (caches, state init)
    batches = run.stream.next_step()[0]
    with count_syncs() as syncs:
        res = train_step(run, batches)
    assert syncs.by_origin() == EXPECTED[zero], dict(syncs.calls)
    assert res.label_tokens == sum(mb.num_label_tokens for mb in batches) > 0
    assert res.tokens == sum(mb.num_tokens for mb in batches)
    assert res.grad_norm is not None and res.grad_norm > 0 and res.loss > 0


@pytest.mark.parametrize("reference", ["model", "adapter"])
def test_preference_step_sync_count(inproc, pairs_data, model_dir, tmp_path, reference):
    """--objective dpo: still one packtrain read per step (loss, pairs, rewards, accuracy,
    log-probs and the norm ride in it); transformers reads once per forward, and the live
    reference is a second forward per micro-batch."""
    from train.loop import train_step
    from train.setup import build
    from train.syncs import count_syncs

    extra = ["--lora"] if reference == "adapter" else []
    run = build(train_args(pairs_data, model_dir, tmp_path / "o", "--zero", "0",
                           "--grad-accum", "2", "--objective", "dpo", *extra), inproc)
    assert run.pref.reference == reference
    train_step(run, run.stream.next_step()[0])
    batches = run.stream.next_step()[0]
    with count_syncs() as syncs:
        res = train_step(run, batches)
    assert syncs.by_origin() == {"packtrain": 1, "transformers": 4}, dict(syncs.calls)
    assert res.pairs["pairs"] == sum(mb.pairs for mb in batches) > 0
    assert res.label_tokens == sum(mb.num_label_tokens for mb in batches)
    assert res.grad_norm > 0 and res.loss > 0


def test_sync_counter_sees_reads_and_their_origin():
    from train.syncs import count_syncs

    t = torch.arange(4)
    with count_syncs() as syncs:
        float(t.sum()), t.tolist(), t[1].item(), bool(t.any()), torch.equal(t, t)
        torch.nonzero(t), torch.nonzero_static(t, size=3)  # the second is sized: no read
    assert sum(syncs.calls.values()) == 6
    assert all("test_step_syncs.py" in site for _, site in syncs.calls)  # the calling line
    assert float(t.sum()) == 6.0  # restored afterwards
    with count_syncs() as syncs:
        pass
    assert syncs.by_origin() == {}


def test_host_facts_match_the_tensors(dataset):
    """The host-side label count, boundaries and longest sample the step trusts are those of the
    tensors (collate)."""
    from pack.format import PackedDataset
    from train.data import PackStream, count_label_tokens

    stream = PackStream(PackedDataset(dataset), micro_batch=3)
    for _ in range(3):
        (mb,), _ = stream.next_step()
        assert mb.label_tokens == count_label_tokens(mb.labels)
        assert mb.bounds == mb.cu_seqlens.tolist()
        assert mb.max_seqlen == max(b - a for a, b in zip(mb.bounds, mb.bounds[1:]))
        assert mb.to("cpu").bounds == mb.bounds


def test_host_counted_loss_equals_device_counted():
    """packed_loss with the host's label count and bounds gives the same loss and gradients as
    the self-checking path; a wrong host count is refused, not trained on."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from train.attention import enable_packed_attention
    from train.loss import packed_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1))
    enable_packed_attention(model, "packtrain_sdpa")
    bounds = [0, 5, 12, 20]
    ids = torch.randint(0, 64, (1, 20))
    labels = ids.clone()
    labels[0, [0, 1, 5, 6, 12]] = -100
    pos = torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])]).unsqueeze(0)
    cu = torch.tensor(bounds, dtype=torch.int32)
    n = int((labels[0, 1:] != -100).sum())
    out = []
    for kw in ({}, {"bounds": bounds, "label_count": n}):
        model.zero_grad()
        loss, count = packed_loss(model, ids, labels, pos, cu, 4, **kw)
        loss.backward()
        out.append((float(loss), count, [p.grad.clone() for p in model.parameters()]))
    assert out[0][:2] == out[1][:2] and out[0][1] == n
    assert all(torch.equal(a, b) for a, b in zip(out[0][2], out[1][2]))
    with pytest.raises(RuntimeError, match="label tokens"):
        packed_loss(model, ids, labels, pos, cu, 4, bounds=bounds, label_count=n - 1)


def test_shift_labels_ignores_out_of_range_ends():
    from train.loss import shift_labels

    labels = torch.arange(10, 16)
    got = shift_labels(labels, torch.tensor([0, 2, 6, 9]))  # 9 - 1 is past the row: ignored
    assert got.tolist() == [11, -100, 13, 14, 15, -100]


def test_ahead_sends_the_next_before_handing_out_the_current():
    from train.prefetch import ahead, device_batches

    log = []
    items = ["a", "b", "c"]
    for x in ahead(items, lambda x: log.append(f"send {x}") or x,
                   lambda x: log.append(f"wait {x}") or x):
        log.append(f"use {x}")
    assert log == ["send a", "send b", "wait a", "use a", "send c", "wait b", "use b",
                   "wait c", "use c"]
    assert list(ahead([], str, str)) == []
    mbs = [object(), object()]
    assert list(ahead(mbs, lambda x: x, lambda x: x)) == mbs
    # on CPU: the same micro-batches, in order, untouched
    from train.data import collate
    import numpy as np

    packs = [{"input_ids": np.arange(4, dtype=np.int32), "labels": np.full(4, -100, np.int32),
              "position_ids": np.arange(4, dtype=np.int32), "cu_seqlens": np.array([0, 4])}]
    batches = [collate(packs, [i]) for i in range(3)]
    moved = list(device_batches(batches, torch.device("cpu")))
    assert [m.pack_ids for m in moved] == [[0], [1], [2]]
    assert all(m.input_ids is b.input_ids for m, b in zip(moved, batches))


def test_optimizer_fused_else_foreach(monkeypatch):
    from train.setup import make_optimizer

    model = torch.nn.Linear(4, 4)
    args = Namespace(weight_decay=0.0, offload="none", lr=1e-3)
    assert make_optimizer(model, args).defaults["fused"] is True
    real = torch.optim.AdamW

    def no_fused(*a, **kw):
        if kw.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be on a supported device")
        return real(*a, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    opt = make_optimizer(model, args)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
