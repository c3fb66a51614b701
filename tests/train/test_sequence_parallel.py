"""train.sequence_parallel (--sequence-parallel N, Ulysses over packs).

* Fast: the slicing of a row (padding sample, pre-shifted labels), head-layout refusals, bad
  flags refused in one line.
* slow, 2 gloo processes, no DeepSpeed: one packed row whose length does not divide by 2, the
  loss and every parameter's gradient of SP = 2 (the ranks' partial gradients summed) against
  1 process, for a tiny Llama (4 heads, 2 KV heads) and a tiny Qwen3 with 1 KV head (repeated).
* slow, the real CLI: `train-run --nproc 2 --sequence-parallel 2` (ZeRO 1, Llama; ZeRO 3, Qwen3)
  against 1 rank on the same packs: per-step losses, label tokens, gradient norms.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pack.errors import PacktrainError
from train.data import MicroBatch
from train.sequence_parallel import SPGroup, kv_repeat, slice_micro_batch

TRAIN_RUN = str(Path(sys.executable).parent / "train-run")


def _row(lengths: list[int], vocab: int = 50, seed: int = 0) -> MicroBatch:
    """One packed row of samples of `lengths`, label -100 at every sample start and a prompt."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    ids = torch.randint(1, vocab, (1, total), generator=g)
    labels = ids.clone()
    pos, cu, start = [], [0], 0
    for n in lengths:
        pos += list(range(n))
        labels[0, start:start + min(2, n)] = -100  # sample start + a one-token prompt
        start += n
        cu.append(start)
    return MicroBatch(ids, labels, torch.tensor([pos]), torch.tensor(cu, dtype=torch.int32),
                      max(lengths), [0])


def test_slices_cover_the_row_once_with_a_padding_sample():
    from train.loss import shift_labels

    mb = _row([5, 3, 7])  # 15 tokens: padded to 16 for N = 2, to 16 for N = 4; none for N = 3
    for n in (2, 3, 4):
        pieces = [slice_micro_batch(mb, SPGroup(n, r, 0, 1)) for r in range(n)]
        assert sum(p.num_tokens for p in pieces) == 15
        assert sum(p.num_label_tokens for p in pieces) == mb.num_label_tokens
        ids = torch.cat([p.input_ids for p in pieces], dim=1)
        assert ids.shape[1] % n == 0 and torch.equal(ids[0, :15], mb.input_ids[0])
        targets = torch.cat([p.labels[0, 1:] for p in pieces])
        assert torch.equal(targets[:15], shift_labels(mb.labels, mb.cu_seqlens))
        assert (targets[15:] == -100).all()
        pad = ids.shape[1] - 15
        assert pad == (-15) % n
        assert pieces[0].cu_seqlens.tolist() == [0, 5, 8, 15] + ([15 + pad] if pad else [])
        pos = torch.cat([p.position_ids for p in pieces], dim=1)[0]
        assert pos[15:].tolist() == list(range(pad))
    even = _row([4, 4])
    assert slice_micro_batch(even, SPGroup(2, 1, 0, 1)).cu_seqlens.tolist() == [0, 4, 8]


def test_head_layouts():
    assert kv_repeat(8, 8, 2) == 1
    assert kv_repeat(8, 2, 2) == 1
    assert kv_repeat(8, 1, 2) == 2
    assert kv_repeat(8, 2, 4) == 2
    with pytest.raises(PacktrainError, match="num_attention_heads 6"):
        kv_repeat(6, 6, 4)
    with pytest.raises(PacktrainError, match="num_key_value_heads 3"):
        kv_repeat(12, 3, 2)


@pytest.mark.parametrize("flags,expect", [
    (["--sequence-parallel", "0"], "--sequence-parallel 0: must be a finite number >= 1"),
    (["--sequence-parallel", "2"], "--sequence-parallel 2: the world size 1 is not a multiple"),
])
def test_bad_flags_one_line(flags, expect, dataset, model_dir, tmp_path):
    r = subprocess.run([TRAIN_RUN, "--shards", str(dataset), "--model", str(model_dir),
                        "--output", str(tmp_path / "o"), "--dtype", "fp32", *flags],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], r.stderr[-2000:]


# ---------------------------------------------------------------- 2 gloo processes, no DeepSpeed

def _grads(model, mb, chunk, sp):
    from train.loss import packed_loss
    from train.sequence_parallel import slice_loss

    model.zero_grad(set_to_none=True)
    if sp is None:
        loss, n = packed_loss(model, mb.input_ids, mb.labels, mb.position_ids, mb.cu_seqlens,
                              chunk, max_length=mb.max_seqlen)
    else:
        loss, n = slice_loss(model, slice_micro_batch(mb, sp), chunk)
    loss.backward()
    return float(loss.detach()), n, {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as tdist

    from train.attention import enable_packed_attention
    from train.sequence_parallel import enable_ulysses
    from train.tiny import make_tiny_model

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                             world_size=2)
    sp = SPGroup(2, rank, 0, 1, tdist.new_group([0, 1]))
    mb = _row([9, 30, 1, 17, 12], vocab=300, seed=1)  # 69 tokens: one padding token
    results = {}
    for arch, kv in (("llama", 2), ("qwen3", 1)):
        model = make_tiny_model(arch, None, vocab_size=300, hidden=32, layers=2, heads=4,
                                kv_heads=kv, seed=0)
        model.train()
        enable_packed_attention(model, "sdpa")
        ref = _grads(model, mb, 16, None) if rank == 0 else None
        enable_ulysses(model, "packtrain_sdpa", sp)
        loss, n, grads = _grads(model, mb, 16, sp)
        totals = torch.tensor([loss, float(n)], dtype=torch.float64)
        tdist.all_reduce(totals)
        for g in grads.values():
            tdist.all_reduce(g)
        if rank == 0:
            rel = max(float((grads[k] - ref[2][k]).norm() / ref[2][k].norm().clamp_min(1e-30))
                      for k in grads)
            results[arch] = {"loss": float(totals[0]), "ref_loss": ref[0], "n": int(totals[1]),
                             "ref_n": ref[1], "grad_rel": rel}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    tdist.destroy_process_group()


@pytest.mark.slow
def test_sp2_loss_and_gradients_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    from train.dist import free_port

    out = tmp_path / "sp.json"
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=2, start_method="spawn")
    res = json.loads(out.read_text())
    for arch, r in res.items():
        assert r["n"] == r["ref_n"] > 0, (arch, r)
        assert abs(r["loss"] - r["ref_loss"]) / r["ref_loss"] < 1e-5, (arch, r)
        assert r["grad_rel"] < 1e-5, (arch, r)


# ---------------------------------------------------------------- the real CLI, 2 ranks (slow)

DRIVER = r'''
import json, os, sys
from train.cli import run_main
for argv in json.load(open(sys.argv[1])):
    rc = run_main(argv)
    if rc:
        sys.exit(rc)
'''
COMMON = ["--dtype", "fp32", "--lr", "3e-3", "--schedule", "constant", "--grad-clip", "1.0",
          "--seed", "0", "--grad-accum", "2", "--max-steps", "3", "--no-export",
          "--eval-every", "2", "--eval-max-packs", "5"]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _driver(work: Path, name: str, jobs: list, nproc: int) -> None:
    (work / f"{name}.json").write_text(json.dumps(jobs))
    (work / "driver.py").write_text(DRIVER)
    launch = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([*launch, str(work / "driver.py"), str(work / f"{name}.json")],
                       capture_output=True, text=True, env=env, timeout=900, cwd=work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]


@pytest.fixture(scope="module")
def cli_runs(dataset, model_dir, tokenizer_dir, work):
    """Llama at ZeRO 1 and a Qwen3 (1 KV head) at ZeRO 3, each with --sequence-parallel 2 on 2
    ranks (one torchrun job) and on 1 rank without SP (one process)."""
    from train.tiny import make_tiny_model

    qwen = make_tiny_model("qwen3", tokenizer_dir, work / "qwen3", hidden=32, layers=2, heads=4,
                           kv_heads=1, seed=0)
    z3 = work / "z3.json"
    z3.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    cases = {"llama-z1": [str(model_dir), "--zero", "1"],
             "qwen3-z3": [str(qwen), "--zero", "3", "--deepspeed", str(z3)]}
    jobs = {n: [] for n in ("sp", "ref")}
    for case, (model, *zero) in cases.items():
        for kind, extra in (("sp", ["--sequence-parallel", "2"]), ("ref", [])):
            jobs[kind].append(["--shards", str(dataset), "--model", model, "--output",
                               str(work / f"{case}-{kind}"), "--eval-shards", str(dataset),
                               *COMMON, *zero, *extra])
    _driver(work, "sp", jobs["sp"], 2)
    _driver(work, "ref", jobs["ref"], 1)
    return {case: (work / f"{case}-sp", work / f"{case}-ref") for case in cases}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["llama-z1", "qwen3-z3"])
def test_train_run_sp2_matches_one_rank(cli_runs, case):
    sp_all, ref_all = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
                       for d in cli_runs[case])
    # the eval loss (steps 0, 2 and 3; 5 packs) is sliced over the group the same way
    sp_eval, ref_eval = ([(m["step"], m["eval_tokens"], m["eval_loss"]) for m in lines
                          if "eval_loss" in m] for lines in (sp_all, ref_all))
    assert [e[:2] for e in sp_eval] == [e[:2] for e in ref_eval] and len(ref_eval) == 3
    assert max(abs(a[2] - b[2]) / b[2] for a, b in zip(sp_eval, ref_eval)) < 1e-5
    sp, ref = ([m for m in lines if "loss" in m] for lines in (sp_all, ref_all))
    assert len(sp) == len(ref) == 3
    for key in ("label_tokens", "tokens"):
        assert [m[key] for m in sp] == [m[key] for m in ref]
    for key in ("loss", "grad_norm"):
        rel = [abs(a[key] - b[key]) / abs(b[key]) for a, b in zip(sp, ref)]
        assert max(rel) < 1e-5, (key, rel)
