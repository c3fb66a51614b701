"""Chunked cross-entropy: equals F.cross_entropy on full logits (loss and gradients), and packed_loss
on a packed row equals the per-sample loss of the unpacked samples, for plain, tied-embedding and
peft-wrapped models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from train.attention import enable_packed_attention
from train.loss import chunked_cross_entropy, head_cross_entropy, model_hidden_and_head, packed_loss, shift_labels

T, H, V = 37, 16, 50


def naive(hidden, weight, labels, bias=None, scale=None, softcap=None):
    logits = F.linear(hidden, weight, bias).float()
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")


def leaves(dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    w = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (T,), generator=g)
    labels[:3] = -100
    labels[8:24] = -100  # whole chunks without a label for small chunk sizes
    return h, w, b, labels


def check_close(got, exp, tol):
    for a, b in zip(got, exp):
        if b is None:
            assert a is None
            continue
        scale = max(1.0, b.float().abs().max().item())
        assert (a.float() - b.float()).abs().max().item() <= tol * scale


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 16, 36, 37, 1024])
def test_matches_full_logits(chunk_size):
    h, w, b, labels = leaves()
    loss, n = chunked_cross_entropy(h, w, labels, chunk_size=chunk_size, bias=b)
    ref = naive(h, w, labels, b)
    assert n == int((labels[1:] != -100).sum())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-6)
    check_close(torch.autograd.grad(loss, (h, w, b)), torch.autograd.grad(ref, (h, w, b)), 1e-6)


@pytest.mark.parametrize("scale,softcap", [(0.5, None), (None, 3.0), (2.0, 4.0)])
def test_logit_scale_and_softcap(scale, softcap):
    h, w, b, labels = leaves()
    loss, _ = chunked_cross_entropy(h, w, labels, chunk_size=6, bias=b, logit_scale=scale, softcap=softcap)
    ref = naive(h, w, labels, b, scale, softcap)
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-6)
    check_close(torch.autograd.grad(loss, (h, w, b)), torch.autograd.grad(ref, (h, w, b)), 1e-6)


def test_scaled_backward_and_single_use():
    h, w, b, labels = leaves()
    loss, _ = chunked_cross_entropy(h, w, labels, chunk_size=8, bias=b)
    got = torch.autograd.grad(loss * 0.25, (h, w, b), retain_graph=True)
    exp = torch.autograd.grad(naive(h, w, labels, b) * 0.25, (h, w, b))
    check_close(got, exp, 1e-6)
    with pytest.raises(RuntimeError, match="twice"):
        torch.autograd.grad(loss, (h,))


def test_no_label_tokens():
    h, w, _, labels = leaves(bias=False)
    labels[:] = -100
    loss, n = chunked_cross_entropy(h, w, labels, chunk_size=4)
    assert n == 0 and loss.item() == 0.0
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert not gh.any() and not gw.any()


def test_bf16_close_to_naive_and_autocast():
    h, w, b, labels = leaves(torch.bfloat16)
    loss, _ = chunked_cross_entropy(h, w, labels, chunk_size=8, bias=b)
    ref = naive(h, w, labels, b)
    torch.testing.assert_close(loss, ref, atol=1e-2, rtol=1e-3)
    got = torch.autograd.grad(loss, (h, w, b))
    assert all(g.dtype == torch.bfloat16 for g in got)
    check_close(got, torch.autograd.grad(ref, (h, w, b)), 2e-2)
    # fp32 leaves under autocast: head matmul in bf16 as the model's own lm_head would be
    h, w, b, labels = leaves()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = chunked_cross_entropy(h, w, labels, chunk_size=8, bias=b)
        ref = naive(h, w, labels, b)
    torch.testing.assert_close(loss, ref, atol=1e-2, rtol=1e-3)
    got = torch.autograd.grad(loss, (h, w, b))
    assert all(g.dtype == torch.float32 for g in got)
    check_close(got, torch.autograd.grad(ref, (h, w, b)), 2e-2)


def test_blocked_weight_gradient_accumulation(monkeypatch):
    """Half-precision weight gradients are accumulated in fp32 over chunks and vocabulary blocks."""
    import train.loss as loss_mod

    monkeypatch.setattr(loss_mod, "_WGRAD_BLOCK", 16)  # V=50: blocks of 16, 16, 16, 2
    assert loss_mod.wgrad_accumulation_mode(torch.device("cpu")) == "blocked"
    h, w, b, labels = leaves(torch.bfloat16)
    loss, _ = chunked_cross_entropy(h, w, labels, chunk_size=3, bias=b)
    ref = naive(h, w, labels, b)
    check_close(torch.autograd.grad(loss, (h, w, b)), torch.autograd.grad(ref, (h, w, b)), 2e-2)
    h, w, b, labels = leaves(torch.float32)
    loss, _ = chunked_cross_entropy(h.bfloat16(), w.bfloat16(), labels, chunk_size=3)
    (gw,) = torch.autograd.grad(loss, (w,))
    exact = torch.autograd.grad(naive(h.bfloat16().float(), w.bfloat16().float(), labels), (w,))[0]
    assert relative(gw, exact) < 1e-2


def relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_no_grad_and_frozen_weight():
    h, w, b, labels = leaves()
    with torch.no_grad():
        loss, _ = chunked_cross_entropy(h, w, labels, chunk_size=8, bias=b)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, naive(h, w, labels, b).detach(), atol=1e-4, rtol=1e-6)
    w.requires_grad_(False)  # e.g. LoRA: head frozen, only the hidden states need a gradient
    loss, _ = chunked_cross_entropy(h, w, labels, chunk_size=8)
    (gh,) = torch.autograd.grad(loss, (h,))
    (rh,) = torch.autograd.grad(naive(h, w, labels), (h,))
    check_close([gh], [rh], 1e-6)


def test_bad_labels_and_shapes():
    h, w, _, labels = leaves(bias=False)
    labels[5] = V
    with pytest.raises(ValueError, match="labels must be -100 or in"):
        chunked_cross_entropy(h, w, labels)
    with pytest.raises(ValueError, match="lengths differ"):
        chunked_cross_entropy(h, w, labels[:-1])
    with pytest.raises(ValueError, match="lm_head_weight"):
        chunked_cross_entropy(h, torch.empty(0), labels.clamp(max=0))


def test_shift_respects_sample_boundaries():
    labels = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    cu = torch.tensor([0, 3, 7])
    assert shift_labels(labels).tolist() == [2, 3, 4, 5, 6, 7, -100]
    assert shift_labels(labels, cu).tolist() == [2, 3, -100, 5, 6, 7, -100]
    # the pack's labels do not mask the next sample's first token: cu_seqlens still prevents the leak
    h, w, _, _ = leaves(bias=False)
    lab = torch.randint(0, V, (T,))
    cu = torch.tensor([0, 10, 25, T])
    loss, n = chunked_cross_entropy(h, w, lab, cu_seqlens=cu)
    ref = sum(naive(h[s:e], w, lab[s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()))
    assert n == T - 3
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# packed_loss on tiny models
# ------------------------------------------------------------------------------------------------

VOCAB = 500
LENGTHS = [7, 12, 1, 9]


def tiny(kind: str, **over):
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
    common.update(over)
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).float().eval()
    return Qwen2ForCausalLM(Qwen2Config(**common)).float().eval()


def packed_batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    ids = torch.randint(0, VOCAB, (total,), generator=g)
    labels = ids.clone()
    labels[torch.rand(total, generator=g) < 0.3] = -100
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    labels[cu[:-1].long()] = -100  # the dataset invariant
    pos = torch.cat([torch.arange(n) for n in LENGTHS])
    return ids, labels, pos, cu


def per_sample_loss(model, ids, labels, cu):
    total, count = 0.0, 0
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        logits = model(input_ids=ids[None, s:e], use_cache=False).logits[0].float()
        lab = labels[s:e]
        total = total + F.cross_entropy(logits[:-1], lab[1:], ignore_index=-100, reduction="sum")
        count += int((lab[1:] != -100).sum())
    return total, count


def compare(model, ref_model, chunk_size=8, trainable=None):
    ids, labels, pos, cu = packed_batch()
    ref, ref_n = per_sample_loss(ref_model, ids, labels, cu)
    ref.backward()
    loss, n = packed_loss(model, ids, labels, pos, cu, chunk_size=chunk_size)
    assert n == ref_n
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-6)
    loss.backward()
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    exp = {k: p.grad for k, p in ref_model.named_parameters() if p.grad is not None}
    assert got.keys() == exp.keys() and got
    if trainable is not None:
        assert all(trainable in k for k in got)
    for k in got:
        scale = max(1.0, exp[k].abs().max().item())
        assert (got[k] - exp[k]).abs().max().item() <= 1e-5 * scale, k


@pytest.mark.parametrize("kind,tied", [("llama", True), ("llama", False), ("qwen2", False)])
def test_packed_loss_matches_per_sample(kind, tied):
    ref_model = tiny(kind, tie_word_embeddings=tied)
    model = copy.deepcopy(ref_model)
    enable_packed_attention(model, "sdpa")
    parts = model_hidden_and_head(model)
    assert (parts.head.weight is parts.model.get_input_embeddings().weight) == tied
    compare(model, ref_model)


@pytest.mark.parametrize("lora_head", [False, True])
def test_packed_loss_peft(lora_head):
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "v_proj"] + (["lm_head"] if lora_head else [])
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    base = tiny("llama")
    ref_model = peft.get_peft_model(copy.deepcopy(base), cfg)
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    model.load_state_dict(ref_model.state_dict())
    enable_packed_attention(model, "sdpa")
    parts = model_hidden_and_head(model)
    assert (type(parts.head) is nn.Linear) != lora_head  # a LoRA head takes the generic checkpointed path
    compare(model, ref_model, trainable="lora_")


def test_head_module_hooks_fire():
    """The loss runs inside head(...) so module hooks (DeepSpeed ZeRO-3 gathers there) see the call."""
    head = nn.Linear(H, V, bias=False)
    calls = []
    head.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    head.register_forward_hook(lambda m, args, out: calls.append("post"))
    h, _, _, labels = leaves(bias=False)
    loss, n = head_cross_entropy(head, h, labels, chunk_size=8)
    assert calls == ["pre", "post"] and "forward" not in head.__dict__
    torch.testing.assert_close(loss, naive(h, head.weight, labels), atol=1e-4, rtol=1e-6)
