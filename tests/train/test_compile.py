"""train-run --compile (train.compile, train.attention_op): the varlen attention custom op and
compiled decoder layers compute what eager does, packs of other lengths do not recompile, and
train-run refuses what it does not support in one line.

Tolerances: CPU fp32. Inductor fuses the norms, RoPE and the MLP and may reorder their reductions;
measured here, compiled vs eager: the loss equal or within 1e-7 (relative), gradients 1e-7 to 9e-7
(relative L2; 1.1e-7 for train-run's Llama at ZeRO 0 and 1.9e-7 for Qwen3 at ZeRO 2 after one
step, their losses equal to the last digit over 3 steps). The bounds below (1e-5) sit 10-100x above
that and far below what any real error gives (a sample that sees its neighbour changes the loss by
~1e-2)."""

from __future__ import annotations

import copy

import pytest
import torch

from test_loop import train_args


def _row(lengths: list[int], vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    ids = torch.randint(0, vocab, (total,), generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    labels = ids.clone()
    labels[cu[:-1].long()] = -100
    pos = torch.cat([torch.arange(n) for n in lengths])
    return ids, labels, pos, cu


def _tiny(arch: str):
    from train.attention import enable_packed_attention
    from train.tiny import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, 300, hidden=32, layers=3, heads=4,
                                                         kv_heads=2)).float().train()
    enable_packed_attention(model, "sdpa")
    return model


def _loss_and_grads(model, lengths, seed):
    from train.loss import packed_loss

    ids, labels, pos, cu = _row(lengths, model.config.vocab_size, seed)
    model.zero_grad(set_to_none=True)
    loss, _ = packed_loss(model, ids, labels, pos, cu, chunk_size=32, bounds=cu.tolist())
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()
                                     if p.grad is not None])


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


# packs of 4 lengths and sample counts: one graph for all of them (and all layers)
LENGTHS = [[13, 40, 7, 22], [50, 3, 11], [100], [31, 31, 31, 5, 9, 2], [64, 64]]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_compiled_layers_match_eager_without_recompiling(arch, monkeypatch):
    import train.attention as A
    from torch._dynamo.utils import counters
    from train.compile import compile_decoder_layers

    # the boundaries come from the host (bounds=): inside the op as in eager, no read back from
    # the device (which would be a sync per layer on CUDA) although compile passes an alias
    reads = []
    convert = A._Boundaries._convert
    monkeypatch.setattr(A._Boundaries, "_convert",
                        staticmethod(lambda *a: reads.append(1) or convert(*a)))

    eager = _tiny(arch)
    compiled = copy.deepcopy(eager)
    assert "3 decoder layers" in compile_decoder_layers(compiled, "packtrain_sdpa")
    assert compiled.config._attn_implementation == "packtrain_sdpa_op"
    torch._dynamo.reset()
    counters.clear()
    for i, lengths in enumerate(LENGTHS):
        l_ref, g_ref = _loss_and_grads(eager, lengths, i)
        l_c, g_c = _loss_and_grads(compiled, lengths, i)
        assert _rel(l_c, l_ref) < 1e-5 and _rel(g_c, g_ref) < 1e-5, (lengths, _rel(l_c, l_ref),
                                                                      _rel(g_c, g_ref))
    assert not reads
    # one frame compiled for every layer and every pack layout: no recompilation, no graph break
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    with torch.no_grad():  # evaluation: a second graph, once
        for i, lengths in enumerate(LENGTHS[:2]):
            from train.loss import packed_loss

            ids, labels, pos, cu = _row(lengths, compiled.config.vocab_size, i)
            packed_loss(compiled, ids, labels, pos, cu, chunk_size=32)
    assert counters["stats"]["unique_graphs"] == 2


def test_compiled_lora_with_checkpointing_matches_eager():
    """LoRA adapters inside the compiled layers, under activation checkpointing: the gradients of
    the adapters equal eager's, and other pack lengths do not recompile."""
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters
    from train.compile import compile_decoder_layers

    eager = _tiny("llama")
    eager.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    eager = get_peft_model(eager, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                             task_type="CAUSAL_LM", init_lora_weights=False))
    compiled = copy.deepcopy(eager)
    compile_decoder_layers(compiled, "packtrain_sdpa")
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for i, lengths in enumerate(LENGTHS[:3]):
        l_ref, g_ref = _loss_and_grads(eager, lengths, i)
        l_c, g_c = _loss_and_grads(compiled, lengths, i)
        assert _rel(l_c, l_ref) < 1e-5 and _rel(g_c, g_ref) < 1e-5, (_rel(l_c, l_ref),
                                                                      _rel(g_c, g_ref))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs == graphs[:1] * 3, graphs  # none after the first pack


def test_custom_op_registration_is_consistent():
    """torch.library.opcheck: the fake (shape) function, the autograd registration and the
    schema agree with the real kernel, on a packed row with GQA."""
    from train.attention_op import varlen_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 30, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 30, 8, generator=g, requires_grad=True)
    v = torch.randn(1, 2, 30, 8, generator=g, requires_grad=True)
    cu = torch.tensor([0, 7, 19, 30], dtype=torch.int32)
    torch.library.opcheck(varlen_attention, (q, k, v, cu, "packtrain_sdpa", 8 ** -0.5, None, None))


def test_op_gradients_equal_the_backend():
    """The op's backward (a recomputation) gives the gradients of packtrain_sdpa itself."""
    from train.attention import packtrain_sdpa_attention
    from train.attention_op import varlen_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, 41, 8, generator=g, dtype=torch.float64)
               for h in (4, 2, 2))
    cu = torch.tensor([0, 5, 6, 30, 41], dtype=torch.int32)
    grads = []
    for use_op in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if use_op:
            out = varlen_attention(*leaves, cu, "packtrain_sdpa", 0.3, None, None)
        else:
            out, _ = packtrain_sdpa_attention(torch.nn.Module(), *leaves, None, scaling=0.3,
                                              cu_seq_lens_q=cu)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append(torch.cat([t.grad.flatten() for t in leaves]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch,zero", [("llama", 0), ("qwen3", 2)])
def test_train_run_compile_matches_eager(inproc, dataset, tokenizer_dir, tmp_path,  # noqa: F811
                                         capsys, monkeypatch, arch, zero):
    """train-run's build and step with --compile vs without: the first step's gradients and
    three steps' losses (fp32, CPU). Llama at ZeRO 0 and Qwen3 at ZeRO 2."""
    from deepspeed.utils import safe_get_full_grad
    from train.loop import train_step
    from train.setup import build
    from train.tiny import make_tiny_model

    model_dir = make_tiny_model(arch, tokenizer_dir, tmp_path / "model", hidden=32, layers=2,
                                heads=4, kv_heads=2, seed=0)
    import train.attention_op as op

    results, op_calls = [], []
    run_op = op._run
    monkeypatch.setattr(op, "_run", lambda *a: op_calls.append(len(results)) or run_op(*a))
    for extra in ([], ["--compile"]):
        args = train_args(dataset, model_dir, tmp_path / f"run{len(results)}", "--zero",
                          str(zero), "--grad-accum", "2", "--kernels", "auto", *extra)
        run = build(args, inproc)
        grads, losses = {}, []

        def grab(engine):
            for name, p in engine.module.named_parameters():
                grads.setdefault(name, safe_get_full_grad(p).detach().clone())

        for step in range(3):
            micro_batches, _ = run.stream.next_step()
            losses.append(train_step(run, micro_batches, before_update=grab if step == 0 else None).loss)
        results.append((losses, grads))
        del run
    assert op_calls and set(op_calls) == {1}  # the compiled run's attention was the op, only it
    started = capsys.readouterr().out  # the start-up lines say what was chosen, and why
    assert "kernels: none (--kernels auto: liger-kernel's Triton kernels need CUDA; the device " \
        "is cpu)" in started
    assert "kernels: none (--kernels auto with --compile: inductor fuses the layers itself)" in started
    assert "compile: 2 decoder layers (dynamic shapes), attention packtrain_sdpa_op" in started
    (l_ref, g_ref), (l_c, g_c) = results
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(l_c, l_ref)), (l_c, l_ref)
    flat_ref = torch.cat([g_ref[k].flatten() for k in sorted(g_ref)])
    flat_c = torch.cat([g_c[k].flatten() for k in sorted(g_ref)])
    print(f"{arch} ZeRO {zero}: losses eager {l_ref}, compiled {l_c}; gradients rel. "
          f"difference {_rel(flat_c, flat_ref):.2e}")
    assert _rel(flat_c, flat_ref) < 1e-5, _rel(flat_c, flat_ref)


def test_compile_refusals(inproc, dataset, model_dir, tmp_path):  # noqa: F811
    """One line each."""
    from pack.errors import PacktrainError
    from train.setup import build

    for extra, words in ((["--zero", "3"], "--zero 3"),
                         (["--kernels", "liger"], "--kernels liger with --compile")):
        args = train_args(dataset, model_dir, tmp_path / "r", "--compile", *extra)
        with pytest.raises(PacktrainError, match=words) as e:
            build(args, inproc)
        assert "\n" not in str(e.value)
