"""train-run --kernels (train.kernels): what auto picks and why, one-line refusals where liger-kernel
cannot run (CPU here: its kernels are Triton, CUDA only), and the patching glue driven through a
stand-in for liger's per-model apply functions (the real kernels are checked on a GPU by
benchmarks/gpu_check.py's kernels section)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import train.kernels as K
from pack.errors import PacktrainError


def test_auto_is_none_on_cpu_and_says_why():
    kernels, why = K.select_kernels("auto", "cpu")
    assert kernels == "none" and "CUDA" in why and "cpu" in why
    assert K.select_kernels("none", "cpu") == ("none", "--kernels none")
    assert K.loss_kernel("none") == K.loss_kernel("liger") == "chunked"
    assert K.loss_kernel("liger-flce") == "liger"


@pytest.mark.parametrize("choice", ["liger", "liger-flce"])
def test_explicit_liger_refused_on_cpu_in_one_line(choice):
    with pytest.raises(PacktrainError, match=f"--kernels {choice}: .*CUDA.*--kernels none") as e:
        K.select_kernels(choice, "cpu")
    assert "\n" not in str(e.value)


def test_missing_package_refused_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(K, "_liger_patch_module",
                        lambda: (None, "liger-kernel is not importable (ModuleNotFoundError: x)"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert K.select_kernels("auto", "cuda") == \
        ("none", "--kernels auto: liger-kernel is not importable (ModuleNotFoundError: x)")
    with pytest.raises(PacktrainError, match="--kernels liger: liger-kernel is not importable"):
        K.select_kernels("liger", "cuda")


def test_compile_turns_auto_off_and_refuses_liger():
    assert K.select_kernels("auto", "cuda", compiled=True)[0] == "none"
    with pytest.raises(PacktrainError, match="--kernels liger with --compile"):
        K.select_kernels("liger", "cuda", compiled=True)
    with pytest.raises(PacktrainError, match="choose one of auto, none, liger, liger-flce"):
        K.select_kernels("fast", "cpu")


def _stand_in(monkeypatch, calls):
    """liger's monkey_patch module as seen by train.kernels: one apply function for llama with
    liger's signature, recording how it is called."""

    def apply_liger_kernel_to_llama(rope=True, cross_entropy=False, fused_linear_cross_entropy=True,
                                    rms_norm=True, swiglu=True, model=None):
        calls.append(dict(rope=rope, cross_entropy=cross_entropy, rms_norm=rms_norm, swiglu=swiglu,
                          fused_linear_cross_entropy=fused_linear_cross_entropy, model=model))

    mod = SimpleNamespace(MODEL_TYPE_TO_APPLY_LIGER_FN={"llama": apply_liger_kernel_to_llama})
    monkeypatch.setattr(K, "_liger_patch_module", lambda: (mod, "ok"))


def _tiny(arch="llama", **overrides):
    from train.tiny import tiny_config
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(tiny_config(arch, 100, hidden=16, layers=1, heads=2,
                                                        kv_heads=1, **overrides))


def test_apply_patches_the_instance_never_the_loss(monkeypatch):
    """The HF model inside a peft wrapper is patched: norm, RoPE, SwiGLU on; liger's own loss
    paths (model.forward) off, whatever the choice: packtrain computes the loss itself."""
    from peft import LoraConfig, get_peft_model

    calls = []
    _stand_in(monkeypatch, calls)
    base = _tiny()
    wrapped = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert K.apply_kernels(wrapped, "liger") == "liger (RMSNorm, RoPE, SwiGLU)"
    assert K.apply_kernels(wrapped, "liger-flce") == \
        "liger (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy)"
    assert K.apply_kernels(wrapped, "none") == "none"
    assert len(calls) == 2
    for c in calls:
        assert c["model"] is base
        assert (c["rope"], c["rms_norm"], c["swiglu"]) == (True, True, True)
        assert not c["cross_entropy"] and not c["fused_linear_cross_entropy"]


def test_apply_refuses_unknown_model_type_and_other_activations(monkeypatch):
    _stand_in(monkeypatch, [])
    with pytest.raises(PacktrainError, match="no kernels for model type 'qwen3'"):
        K.apply_kernels(_tiny("qwen3"), "liger")
    with pytest.raises(PacktrainError, match="SwiGLU assumes a silu activation; llama has 'gelu'"):
        K.apply_kernels(_tiny(hidden_act="gelu"), "liger")


def test_loss_kernel_argument_is_checked():
    from train.loss import chunked_cross_entropy

    h, w = torch.randn(6, 4), torch.randn(10, 4)
    labels = torch.tensor([-100, 1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="unknown loss kernel 'fast'"):
        chunked_cross_entropy(h, w, labels, kernel="fast")
    with pytest.raises(ValueError, match="no per-dataset sums or logit scale"):
        chunked_cross_entropy(h, w, labels, kernel="liger", logit_scale=0.5)


def test_liger_loss_kernel_gets_the_chunked_loss_tokens(monkeypatch):
    """packed_loss(kernel='liger') hands liger's function the shifted, selected label tokens (a
    stand-in computes plain CE on them): loss, count and gradients equal the chunked loss's."""
    import torch.nn.functional as F
    from train.attention import enable_packed_attention
    from train.loss import packed_loss

    seen = []

    def stand_in(hidden, weight, targets, bias=None, softcap=None):
        seen.append(targets)
        return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")

    monkeypatch.setattr(K, "liger_linear_cross_entropy", stand_in)
    torch.manual_seed(0)
    model = _tiny()
    enable_packed_attention(model, "sdpa")
    lengths = [7, 12, 5]
    ids = torch.randint(0, 100, (sum(lengths),))
    labels = ids.clone()
    labels[[0, 1, 7, 8, 9, 19]] = -100  # sample starts and a prompt span
    cu = torch.tensor([0, 7, 19, 24], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])
    out = {}
    for kernel in ("chunked", "liger"):
        model.zero_grad(set_to_none=True)
        loss, n = packed_loss(model, ids, labels, pos, cu, chunk_size=4, kernel=kernel)
        loss.backward()
        out[kernel] = (loss.detach(), n, torch.cat([p.grad.flatten() for p in model.parameters()]))
    (l_c, n_c, g_c), (l_l, n_l, g_l) = out["chunked"], out["liger"]
    # 24 tokens; no target at t where labels[t + 1] is -100 (t = 0, 6, 7, 8, 18) or t ends a
    # sample (6, 18, 23): 6 positions
    assert n_c == n_l == len(seen[0]) == 24 - 6 and bool((seen[0] >= 0).all())
    assert torch.allclose(l_l, l_c, rtol=1e-6) and torch.allclose(g_l, g_c, rtol=1e-5, atol=1e-7)
