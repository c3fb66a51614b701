"""Packed (varlen) attention: a packed row gives the same logits and gradients as its samples run
one by one, for every backend available on this machine; the failure modes give clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OpenAIGPTConfig,
    OpenAIGPTLMHeadModel,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from train.attention import (
    AttentionBackendError,
    BACKEND_NAMES,
    enable_packed_attention,
    packed_forward_kwargs,
    packtrain_flash_attention,
    packtrain_sdpa_attention,
    packtrain_torch_attention,
    select_backend,
)

VOCAB = 1000
LENGTHS = [9, 1, 17, 5]  # includes a 1-token sample and samples longer than the small sliding window

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "mistral": (MistralConfig, MistralForCausalLM, {}),
    # sliding-window variants: windows shorter than some samples
    "mistral-window": (MistralConfig, MistralForCausalLM, {"sliding_window": 6}),
    "qwen2-window": (
        Qwen2Config,
        Qwen2ForCausalLM,
        {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1},
    ),
}


def tiny_model(arch: str, seed: int = 0, **overrides) -> nn.Module:
    cfg_cls, model_cls, extra = ARCHS[arch]
    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        vocab_size=VOCAB,
        max_position_embeddings=256,
        attention_dropout=0.0,
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kwargs)).float().eval()
    return model


def packed_row(lengths=LENGTHS, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    ids = torch.randint(0, VOCAB, (1, total), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, pos, cu


def per_sample(model, ids, cu, weights):
    """Logits of each sample run alone ([1, T, V] once concatenated) and the matching loss."""
    outs = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        outs.append(model(input_ids=ids[:, s:e], use_cache=False).logits)
    logits = torch.cat(outs, dim=1)
    return logits, (logits * weights).sum()


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        scale = max(1.0, b[name].abs().max().item())  # fp32 summation order differs: compare relative to scale
        err = (a[name] - b[name]).abs().max().item()
        assert err <= 1e-5 * scale, f"{name}: max abs diff {err:.3g} (grad scale {scale:.3g})"


def cpu_backends():
    return ["packtrain_sdpa", "sdpa"]  # ours, and transformers' own sdpa (block mask from position_ids)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("arch", list(ARCHS))
def test_packed_logits_and_grads_match_per_sample(arch, backend):
    ref_model = tiny_model(arch)
    model = copy.deepcopy(ref_model)
    if backend in BACKEND_NAMES:
        enable_packed_attention(model, backend)
        assert model.config._attn_implementation == backend
    ids, pos, cu = packed_row()
    weights = torch.randn(1, ids.shape[1], VOCAB, generator=torch.Generator().manual_seed(2))

    ref_logits, ref_loss = per_sample(ref_model, ids, cu, weights)
    ref_loss.backward()

    kwargs = packed_forward_kwargs(cu, pos)
    if backend not in BACKEND_NAMES:  # transformers' sdpa reads only position_ids
        kwargs = {k: kwargs[k] for k in ("position_ids", "use_cache", "attention_mask")}
    logits = model(input_ids=ids, **kwargs).logits
    assert (logits - ref_logits).abs().max().item() < 1e-5
    (logits * weights).sum().backward()
    assert_grads_close(grads(model), grads(ref_model))


def test_position_ids_alone_give_boundaries():
    """Without cu_seq_lens the boundaries are derived from position_ids (same rule as transformers)."""
    ref_model = tiny_model("llama")
    model = copy.deepcopy(ref_model)
    enable_packed_attention(model, "sdpa")
    ids, pos, cu = packed_row()
    ref_logits, _ = per_sample(ref_model, ids, cu, 0)
    logits = model(input_ids=ids, position_ids=pos[None], use_cache=False).logits
    assert (logits - ref_logits).abs().max().item() < 1e-5


def test_dropout_in_training_is_applied_per_sample():
    model = tiny_model("llama", attention_dropout=0.5)
    enable_packed_attention(model, "packtrain_sdpa")
    ids, pos, cu = packed_row()
    kwargs = packed_forward_kwargs(cu, pos)
    with torch.no_grad():
        eval_logits = model(input_ids=ids, **kwargs).logits
        model.train()
        torch.manual_seed(5)
        a = model(input_ids=ids, **kwargs).logits
        torch.manual_seed(5)
        b = model(input_ids=ids, **kwargs).logits
        torch.manual_seed(6)
        c = model(input_ids=ids, **kwargs).logits
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, eval_logits)


def _dense_reference(q, k, v, lengths, scaling, window=None, softcap=None):
    """Naive attention over the packed row with a block-diagonal causal (windowed) mask."""
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, 1)
    v = v.repeat_interleave(n_rep, 1)
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    i = torch.arange(q.shape[2])
    allowed = (sample[:, None] == sample[None, :]) & (i[:, None] >= i[None, :])
    if window is not None:
        allowed &= (i[:, None] - i[None, :]) < window
    scores = q @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("window,softcap", [(None, None), (4, None), (None, 5.0), (4, 5.0)])
def test_sdpa_function_gqa_window_softcap(window, softcap):
    torch.manual_seed(0)
    lengths = [6, 1, 11, 3]
    total = sum(lengths)
    q = torch.randn(1, 8, total, 16, requires_grad=True)
    k = torch.randn(1, 2, total, 16, requires_grad=True)
    v = torch.randn(1, 2, total, 16, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    module = nn.Module()
    module.is_causal = True
    out, weights = packtrain_sdpa_attention(
        module, q, k, v, None, scaling=0.3, sliding_window=window, softcap=softcap,
        cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=11, max_length_k=11,
    )
    assert weights is None and out.shape == (1, total, 8, 16)
    ref = _dense_reference(q, k, v, lengths, 0.3, window, softcap)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    exp = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_select_backend_on_cpu():
    cpu = torch.device("cpu")
    assert select_backend("auto", cpu) == "packtrain_sdpa"
    assert select_backend("sdpa", cpu) == "packtrain_sdpa"
    assert select_backend("packtrain_sdpa", "cpu") == "packtrain_sdpa"
    assert select_backend("auto", cpu, torch.float32) == "packtrain_sdpa"
    for name in ("flash", "torch", "packtrain_flash", "packtrain_torch"):
        with pytest.raises(AttentionBackendError, match=r"unavailable"):
            select_backend(name, cpu)
    with pytest.raises(AttentionBackendError, match="unknown attention backend"):
        select_backend("fast", cpu)
    assert issubclass(AttentionBackendError, ValueError)


def test_cuda_backends_refuse_cpu_tensors():
    q = torch.randn(1, 4, 6, 8, dtype=torch.bfloat16)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    for fn in (packtrain_torch_attention, packtrain_flash_attention):
        with pytest.raises(AttentionBackendError):
            fn(nn.Module(), q, q, q, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6, max_length_k=6)


def test_batch_greater_than_one_is_refused():
    model = tiny_model("llama")
    enable_packed_attention(model, "sdpa")
    ids = torch.randint(0, VOCAB, (2, 8))
    pos = torch.arange(8).repeat(2, 1)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(AttentionBackendError, match="batch size must be 1"):
        model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=8,
              max_length_k=8, use_cache=False)


def test_missing_boundaries_and_cache_are_refused():
    ref_model = tiny_model("llama")
    model = copy.deepcopy(ref_model)
    enable_packed_attention(model, "sdpa")
    ids = torch.randint(0, VOCAB, (1, 8))
    # no packing kwargs: the model's own position_ids (0..T-1) make it one sample, as unpacked
    torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits,
                               ref_model(input_ids=ids, use_cache=False).logits, atol=1e-5, rtol=0)
    q = torch.randn(1, 4, 8, 8)
    with pytest.raises(AttentionBackendError, match="packed_forward_kwargs"):
        packtrain_sdpa_attention(nn.Module(), q, q, q, None)
    q = torch.randn(1, 4, 1, 8)
    k = torch.randn(1, 4, 5, 8)
    with pytest.raises(AttentionBackendError, match="KV cache"):
        packtrain_sdpa_attention(nn.Module(), q, k, k, None, position_ids=torch.zeros(1, 1, dtype=torch.long))


def test_bad_cu_seqlens_are_refused():
    q = torch.randn(1, 4, 8, 8)
    for cu in ([0, 5], [0, 5, 5, 8], [1, 8]):
        cu = torch.tensor(cu, dtype=torch.int32)
        with pytest.raises(AttentionBackendError, match="cu_seqlens"):
            packtrain_sdpa_attention(nn.Module(), q, q, q, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                     max_length_q=8, max_length_k=8)


def test_packed_forward_kwargs():
    ids, pos, cu = packed_row()
    kw = packed_forward_kwargs(cu.long(), pos)
    assert kw["use_cache"] is False and kw["attention_mask"] is None
    assert kw["cu_seq_lens_q"].dtype == torch.int32 and kw["cu_seq_lens_k"] is kw["cu_seq_lens_q"]
    assert kw["max_length_q"] == kw["max_length_k"] == max(LENGTHS)
    assert kw["position_ids"].shape == (1, sum(LENGTHS)) and kw["position_ids"].dtype == torch.long
    assert packed_forward_kwargs(cu, pos, max_length=99)["max_length_q"] == 99
    with pytest.raises(AttentionBackendError, match="cu_seqlens"):
        packed_forward_kwargs(torch.tensor([0, 5]), pos)
    bad = pos.clone()
    bad[9] = 3  # the 1-token sample at index 9 must have position 0
    with pytest.raises(AttentionBackendError, match="position_ids do not restart"):
        packed_forward_kwargs(cu, bad)
    with pytest.raises(AttentionBackendError, match="one packed row"):
        packed_forward_kwargs(cu, pos.repeat(2, 1))


def test_model_without_attention_interface_is_refused():
    gpt = OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=100, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(AttentionBackendError, match="OpenAIGPTLMHeadModel"):
        enable_packed_attention(gpt, "sdpa")

    class HomeMadeConfig(PretrainedConfig):
        model_type = "home_made"

    class HomeMadeLM(PreTrainedModel):
        config_class = HomeMadeConfig

        def __init__(self, config):
            super().__init__(config)
            self.proj = nn.Linear(4, 4)

    with pytest.raises(AttentionBackendError, match="HomeMadeLM"):
        enable_packed_attention(HomeMadeLM(HomeMadeConfig()), "sdpa")
    with pytest.raises(AttentionBackendError, match="not a transformers PreTrainedModel"):
        enable_packed_attention(nn.Linear(2, 2), "sdpa")
    with pytest.raises(AttentionBackendError, match="select_backend"):
        enable_packed_attention(tiny_model("llama"), "auto")


def test_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    ref_model = tiny_model("qwen3")
    model = peft.get_peft_model(
        copy.deepcopy(ref_model), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    enable_packed_attention(model, "sdpa")
    assert model.get_base_model().config._attn_implementation == "packtrain_sdpa"
    ids, pos, cu = packed_row()
    ref_logits, _ = per_sample(ref_model, ids, cu, 0)  # LoRA B starts at zero: same function
    logits = model(input_ids=ids, **packed_forward_kwargs(cu, pos)).logits
    assert (logits - ref_logits).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------------------
# The CUDA adapters, driven on CPU with stand-in kernels that follow the flash varlen contract
# (q/k/v [T, H, D], int32 cu_seqlens, window (left, right) with -1 = unbounded, causal = right 0).
# They check the argument plumbing (layout, GQA, scale, window, dtype) that the GPU check measures.
# ------------------------------------------------------------------------------------------------


def _flash_semantics(q, k, v, cu, scale, left, right, hkv_repeat):
    assert cu.dtype == torch.int32 and q.dim() == 3
    if hkv_repeat:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    assert k.shape[1] == q.shape[1], "kernel given GQA inputs without enable_gqa"
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        i = torch.arange(e - s)
        d = i[:, None] - i[None, :]
        allowed = torch.ones_like(d, dtype=torch.bool)
        if right >= 0:
            allowed &= d >= -right
        if left >= 0:
            allowed &= d <= left
        qs, ks, vs = (x[s:e].transpose(0, 1).float() for x in (q, k, v))
        scores = (qs @ ks.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
        out[s:e] = (scores.softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
    return out


def new_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch >= 2.12 signature."""
    assert isinstance(window_size, tuple)
    return _flash_semantics(query, key, value, cu_seq_q, scale, window_size[0], window_size[1], enable_gqa)


def old_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10 signature: no scale, no window, no GQA."""
    return _flash_semantics(query, key, value, cu_seq_q, None, -1, 0 if is_causal else -1, False)


def fake_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                      softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                      deterministic=False, return_attn_probs=False):
    assert dropout_p == 0.0 and softcap in (0.0, None)
    return _flash_semantics(q, k, v, cu_seqlens_q, softmax_scale, window_size[0], 0 if causal else window_size[1],
                            True)


@pytest.fixture
def cpu_kernels(monkeypatch):
    import inspect

    import train.attention as att

    monkeypatch.setattr(att, "_REQUIRE_CUDA", False)

    def use(kind, fn):
        params = frozenset(inspect.signature(fn).parameters)
        target = "_torch_varlen" if kind == "torch" else "_flash_attn"
        monkeypatch.setattr(att, target, lambda: (fn, params))

    return use


@pytest.mark.parametrize("kernel", ["torch-new", "torch-old", "flash"])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("scaling", [None, 0.2])
def test_cuda_adapters_with_cpu_stand_in(cpu_kernels, kernel, window, scaling):
    fn = {"torch-new": new_varlen_attn, "torch-old": old_varlen_attn, "flash": fake_flash_varlen}[kernel]
    cpu_kernels("flash" if kernel == "flash" else "torch", fn)
    adapter = packtrain_flash_attention if kernel == "flash" else packtrain_torch_attention
    torch.manual_seed(0)
    lengths = [6, 1, 11, 3]
    total = sum(lengths)
    q = torch.randn(1, 8, total, 16, dtype=torch.bfloat16)
    k = torch.randn(1, 2, total, 16, dtype=torch.bfloat16)
    v = torch.randn(1, 2, total, 16, dtype=torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=11, max_length_k=11)
    module = nn.Module()
    if kernel == "torch-old" and window is not None:
        with pytest.raises(AttentionBackendError, match="no sliding window"):
            adapter(module, q, k, v, None, scaling=scaling, sliding_window=window, **kw)
        return
    out, w = adapter(module, q, k, v, None, scaling=scaling, sliding_window=window, **kw)
    ref, _ = packtrain_sdpa_attention(module, q.float(), k.float(), v.float(), None, scaling=scaling,
                                      sliding_window=window, **kw)
    assert w is None and out.shape == (1, total, 8, 16) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_cuda_adapters_dtype_and_dropout(cpu_kernels):
    cpu_kernels("torch", new_varlen_attn)
    q = torch.randn(1, 4, 6, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4, max_length_k=4)
    with pytest.raises(AttentionBackendError, match="needs fp16/bf16"):
        packtrain_torch_attention(nn.Module(), q, q, q, None, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 q/k under autocast: cast like HF's flash path
        out, _ = packtrain_torch_attention(nn.Module(), q, q, q, None, **kw)
    assert out.dtype == torch.float32
    with pytest.raises(AttentionBackendError, match="dropout"):
        packtrain_torch_attention(nn.Module(), q.bfloat16(), q.bfloat16(), q.bfloat16(), None, dropout=0.1, **kw)
    with pytest.raises(AttentionBackendError, match="softcap"):
        packtrain_torch_attention(nn.Module(), q.bfloat16(), q.bfloat16(), q.bfloat16(), None, softcap=5.0, **kw)
