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
from train.data import segment_label_counts
from train.preference import pair_losses, segment_logps

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
    assert torch.allclose((ch - rj).float(), z)
    n = torch.tensor([3, 5, 2, 1])
    loss, ch, rj = pair_losses("simpo", pol, None, n, beta=2.0, gamma=0.5)
    z = 2.0 * torch.tensor([-3 / 3 + 5 / 5, -2 / 2 + 1 / 1]) - 0.5
    assert torch.allclose(loss, -F.logsigmoid(z))


# ---------------------------------------------------------------- train-run's step (1 rank)

import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from preference_cases import (COMMON, packed_step, rel_grad_error, step_packs,  # noqa: E402
                              unpacked_reference)
from test_loop import clean_env  # noqa: E402

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def ref_dir(tokenizer_dir, work) -> Path:
    """A second tiny Llama (another seed): the --ref-model of the live-reference cases."""
    from train.tiny import make_tiny_model

    return make_tiny_model("llama", tokenizer_dir, work / "ref", hidden=32, layers=2, heads=4,
                           kv_heads=2, seed=1)


@pytest.fixture(scope="module")
def stored_data(pairs_data, model_dir, work) -> Path:
    """A copy of the pairs with a stored reference sidecar for model_dir (pack.reference's
    writer; the values are arbitrary log-probs, so that they differ from a live forward)."""
    from pack.format import PackedDataset, read_manifest
    from pack.reference import ReferenceWriter, model_fingerprint

    out = work / "pairs-stored"
    shutil.copytree(pairs_data, out)
    writer = ReferenceWriter(out, str(model_dir), model_fingerprint(model_dir), "fp32")
    ds = PackedDataset(out)
    first = 0
    for s, info in enumerate(read_manifest(out)["shards"]):
        rows = [-(1.0 + 0.37 * np.arange(len(ds[i]["cu_seqlens"]) - 1) + 0.11 * i)
                for i in range(first, first + info["packs"])]
        writer.write_shard(s, rows)
        first += info["packs"]
    writer.commit()
    return out


def _args(data, model, out, *extra):
    from train.cli import parse_run_args

    return parse_run_args(["--shards", str(data), "--model", str(model), "--output", str(out),
                           *COMMON, *extra])


CASES = {  # name: (dataset fixture, extra options); one packed step vs the pairs unpacked
    "dpo-live-model": ("pairs_data", ["--objective", "dpo", "--ref-model", "REF"]),
    "dpo-stored": ("stored_data", ["--objective", "dpo", "--ref-logps", "stored"]),
    "dpo-lora-base": ("pairs_data", ["--objective", "dpo", "--lora", "--lora-r", "4"]),
    "dpo-lora-base-ckpt": ("pairs_data", ["--objective", "dpo", "--lora", "--lora-r", "4",
                                          "--gradient-checkpointing"]),
    "dpo-qlora-base": ("pairs_data", ["--objective", "dpo", "--qlora", "--lora-r", "4"]),
    "simpo": ("pairs_data", ["--objective", "simpo"]),
}
# The pair weight sigmoid(-z) carries fp32 rounding of segment log-prob sums of ~500 nats (ulp
# 3e-5, both sides off by up to 2 ulps: z = 0.1 * their differences off by up to 1.2e-5 under
# --qlora, 0.9e-5 under --lora), which moves every gradient by ~|dz|/2 relative. Measured max rel.
# gradient error: 2.0e-6 (--lora), 5.5e-6 (--qlora); the bound gives --qlora 3.6x room, 4 orders
# below the 0.55 of an unpacked side on the full-precision base instead of the NF4 one.
GRAD_TOL = {"dpo-qlora-base": 2e-5}
NEEDS_BNB = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="--qlora needs bitsandbytes")


def random_lora_b(monkeypatch) -> None:
    """Every model train.setup.load_model returns gets the same random LoRA B (both sides of a
    comparison load through it): with B = 0 the policy equals the adapters-disabled reference
    (every pair's loss exactly log 2) and LoRA A gets no gradient."""
    import train.setup
    from helpers import randomise_lora_b

    real = train.setup.load_model

    def load(*a, **kw):
        model, keep_alive = real(*a, **kw)
        randomise_lora_b(model)
        return model, keep_alive

    monkeypatch.setattr(train.setup, "load_model", load)


@pytest.mark.parametrize("case", [pytest.param(c, marks=NEEDS_BNB) if "--qlora" in extra else c
                                  for c, (_, extra) in CASES.items()])
def test_packed_step_equals_pairs_unpacked(inproc, request, model_dir, ref_dir, tmp_path,
                                           monkeypatch, case):
    """One optimizer step (2 micro-steps x 2 packs, ZeRO 0, fp32) of packed pairs has the loss
    and gradients of the same pairs run one at a time (rel. error < 1e-5; gradients under
    --qlora < 2e-5, see GRAD_TOL): DPO with a live
    --ref-model, with stored reference log-probs, with the frozen base under LoRA (random B:
    policy != reference) and under QLoRA (the NF4 base, fp32 compute, on both sides); SimPO."""
    from train.setup import build

    data = request.getfixturevalue(CASES[case][0])
    extra = [str(ref_dir) if x == "REF" else x for x in CASES[case][1]]
    args = _args(data, model_dir, tmp_path / "o", "--zero", "0", "--grad-accum", "2",
                 "--micro-batch", "2", *extra)
    if args.lora:
        random_lora_b(monkeypatch)
    reader = None
    if args.ref_logps == "stored":
        from preference_cases import stored_reader

        reader = stored_reader(args)
    ref_loss, ref_grads, pairs = unpacked_reference(args, step_packs(args, 1), reader)
    run = build(args, inproc)
    want = {"dpo-live-model": "model", "dpo-stored": "stored", "dpo-lora-base": "adapter",
            "dpo-lora-base-ckpt": "adapter", "dpo-qlora-base": "adapter", "simpo": "none"}[case]
    assert run.pref.reference == want
    four_bit = any(hasattr(p, "quant_state") for p in run.model.parameters())
    assert four_bit == bool(args.qlora)
    res, grads = packed_step(run)
    loss_err, grad_err = abs(res.loss - ref_loss) / ref_loss, rel_grad_error(grads, ref_grads)
    print(f"{case}: loss {res.loss:.8f} vs {ref_loss:.8f} (rel {loss_err:.2g}); "
          f"max rel grad error {grad_err:.2g} over {len(ref_grads)} tensors")
    assert res.pairs["pairs"] == pairs > 4  # several pairs per pack
    assert loss_err < 1e-5, (res.loss, ref_loss)
    assert grad_err < GRAD_TOL.get(case, 1e-5)
    if args.lora:  # every LoRA weight learns; the pairs are not all at log 2
        assert len(ref_grads) == sum(p.requires_grad for p in run.model.parameters())
        assert all(float(g.norm()) > 0 for g in ref_grads.values())
        assert abs(ref_loss - math.log(2)) > 1e-3, ref_loss
    assert 0.0 <= res.pairs["rewards/accuracy"] <= 1.0
    margin = res.pairs["rewards/chosen"] - res.pairs["rewards/rejected"]
    assert res.pairs["rewards/margin"] == pytest.approx(margin)


# ---------------------------------------------------------------- 2 ranks (slow)

@pytest.fixture(scope="module")
def two_rank_pairs(pairs_data, stored_data, model_dir, ref_dir, work) -> dict:
    """One torchrun job of 2 ranks: one packed step per case, each against the same pairs run
    unpacked (preference_cases.driver). ZeRO-3 cases last."""
    z3 = work / "z3.json"
    z3.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    base = ["--model", str(model_dir), *COMMON, "--grad-accum", "2", "--objective", "dpo"]
    evals = ["--eval-shards", str(pairs_data), "--eval-max-packs", "5"]
    cases = {
        "live-model-z0": ["--shards", str(pairs_data), "--zero", "0", "--ref-model", str(ref_dir),
                          *evals],
        "stored-z2": ["--shards", str(stored_data), "--zero", "2", "--ref-logps", "stored"],
        "sp2-live-model-z1": ["--shards", str(pairs_data), "--zero", "1", "--ref-model",
                              str(ref_dir), "--sequence-parallel", "2", *evals],
        "lora-base-z3": ["--shards", str(pairs_data), "--zero", "3", "--deepspeed", str(z3),
                         "--lora", "--lora-r", "4"],
        "live-model-z3": ["--shards", str(pairs_data), "--zero", "3", "--deepspeed", str(z3),
                          "--ref-model", str(ref_dir), *evals],
    }
    jobs = {name: [*argv, *base, "--output", str(work / f"r2-{name}")]
            for name, argv in cases.items()}
    (work / "pref-cases.json").write_text(json.dumps(jobs))
    env = clean_env(PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", str(HERE / "preference_cases.py"),
                        str(work / "pref-cases.json"), str(work / "pref-results.json")],
                       capture_output=True, text=True, env=env, timeout=1200, cwd=work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return json.loads((work / "pref-results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["live-model-z0", "stored-z2", "sp2-live-model-z1",
                                  "lora-base-z3", "live-model-z3"])
def test_two_ranks_packed_dpo_equals_unpacked(two_rank_pairs, case):
    """2 ranks (ZeRO 0-3, stored or live reference, sequence parallel 2): the step's loss is
    the mean over every pair of both ranks and both micro-steps, and its gradients are those
    of the pairs run one at a time (rel. error < 1e-5)."""
    r = two_rank_pairs[case]
    assert r["pairs"] == r["ref_pairs"] > 4
    assert r["reference"] == {"stored-z2": "stored", "lora-base-z3": "adapter"}.get(case, "model")
    assert abs(r["loss"] - r["ref_loss"]) / r["ref_loss"] < 1e-5, r
    assert r["grad_err"] < 1e-5, r


@pytest.mark.slow
def test_two_ranks_eval_pairs_agree(two_rank_pairs):
    """The eval set's pair metrics before training (same weights, same reference) agree across
    ZeRO 0, ZeRO 3 and sequence parallel 2 (each rank evaluating its piece of every row)."""
    runs = {k: v["eval"] for k, v in two_rank_pairs.items() if v["eval"] is not None}
    assert set(runs) == {"live-model-z0", "sp2-live-model-z1", "live-model-z3"}
    want = runs.pop("live-model-z0")
    assert want["eval_pairs"] > 4 and want["eval_loss"] > 0
    for name, got in runs.items():
        assert got["eval_pairs"] == want["eval_pairs"], name
        for key in ("eval_loss", "eval_rewards/margin", "eval_logps/chosen"):
            assert abs(got[key] - want[key]) <= 1e-5 * abs(want[key]), (name, key, got, want)
        assert got["eval_rewards/accuracy"] == want["eval_rewards/accuracy"], name


# ---------------------------------------------------------------- train-run end to end

def test_train_run_dpo_stored_reference_eval_and_best(inproc, stored_data, model_dir, tmp_path,
                                                      capsys):
    """train-run --objective dpo on a dataset with stored reference log-probs (auto picks them,
    the eval set's too): metrics.jsonl has the pair metrics every step and the eval's at steps
    0, 2 and 3; --save-best follows the eval loss."""
    from train.cli import run_main

    out = tmp_path / "o"
    assert run_main(["--shards", str(stored_data), "--model", str(model_dir), "--output",
                     str(out), *COMMON, "--objective", "dpo", "--beta", "0.5", "--max-steps",
                     "3", "--eval-shards", str(stored_data), "--eval-every", "2",
                     "--eval-max-packs", "6", "--save-best", "--lr", "3e-3"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "reference: stored log-probs of" in printed and "beta 0.5" in printed
    step_lines = [x for x in captured.err.splitlines() if x.startswith("step 3/3 loss")]
    assert step_lines and " margin " in step_lines[0] and " acc " in step_lines[0], captured.err
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        assert m["pairs"] > 0 and 0 <= m["rewards/accuracy"] <= 1
        assert m["rewards/margin"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"])
        assert m["logps/chosen"] < 0 and m["logps/rejected"] < 0
    evals = [m for m in lines if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 2, 3]
    assert all(m["eval_pairs"] == evals[0]["eval_pairs"] > 0 for m in evals)
    assert all("eval_rewards/accuracy" in m for m in evals)
    best = min(evals, key=lambda m: m["eval_loss"])
    if best["step"]:
        assert (out / "checkpoints" / "best").read_text().strip().endswith(f"{best['step']:08d}")


@pytest.mark.parametrize("flags, says", [
    (["--objective", "dpo"], "is an SFT dataset"),
    (["--objective", "sft", "PAIRS"], "a preference dataset"),
    (["--beta", "0.2"], "--beta: only for --objective dpo or simpo"),
    (["--objective", "simpo", "--ref-model", "X", "PAIRS"], "SimPO uses no reference"),
    (["--objective", "dpo", "--simpo-gamma", "1", "PAIRS"], "--simpo-gamma: only for"),
    (["--objective", "dpo", "--beta", "0", "PAIRS"], "--beta 0.0: must be"),
    (["--objective", "dpo", "--ref-logps", "stored", "PAIRS"], "--ref-logps stored:"),
    (["--objective", "dpo", "--shards", "PAIRS", "PAIRS"], "mixtures of datasets"),
])
def test_wrong_objective_options_are_one_line_errors(inproc, dataset, pairs_data, model_dir,
                                                     tmp_path, capsys, flags, says):
    from train.cli import run_main

    shards = pairs_data if "PAIRS" in flags else dataset
    flags = [str(pairs_data) if f == "PAIRS" and i and flags[i - 1] == "--shards" else f
             for i, f in enumerate(flags) if f != "PAIRS" or (i and flags[i - 1] == "--shards")]
    rc = run_main(["--shards", str(shards), "--model", str(model_dir), "--output",
                   str(tmp_path / "o"), *COMMON, *flags])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and says in lines[0], lines
