"""Smoke runs of the training benchmarks at minimal sizes, so the scripts do not rot: they run end to
end, write their JSON, and the numbers they report are consistent with what they measured."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_loss_memory_small(tmp_path):
    out = tmp_path / "loss_memory.json"
    p = _run(["benchmarks/loss_memory.py", "--lengths", "512", "--vocab", "4000", "--hidden", "16",
              "--chunk", "64", "--sample-len", "100", "--mem-limit-gib", "4", "--out", str(out)])
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert [row["length"] for row in r["rows"]] == [512]
    for row in r["rows"]:
        full, chunked = row["full"], row["chunked"]
        assert full and chunked
        # same loss and gradients, by two independent computations in two processes
        assert abs(full["loss_sum"] - chunked["loss_sum"]) <= 1e-4 * abs(full["loss_sum"])
        assert row["max_abs_diff_loss_per_token"] < 1e-4
        assert row["max_abs_diff_grad_h"] <= 1e-5 + 1e-4 * row["max_abs_grad_h"]
        assert row["max_abs_diff_grad_w"] <= 1e-5 + 1e-4 * row["max_abs_grad_w"]
        # every token is a target except the last of each 100-token sample
        assert chunked["label_tokens"] == full["label_tokens"] > 0.95 * row["length"]
        assert full["extra_peak_mb"] > 0 and chunked["extra_peak_mb"] > 0
    assert (tmp_path / "loss_memory.png").exists() or "matplotlib not installed" in p.stderr


def test_loss_memory_skips_full_logits_over_the_limit(tmp_path):
    out = tmp_path / "lm.json"
    # 2048 x 50,000 fp32 logits are 0.38 GiB; a 0.1 GiB limit leaves only the chunked loss to run
    p = _run(["benchmarks/loss_memory.py", "--lengths", "2048", "--vocab", "50000", "--hidden", "8",
              "--mem-limit-gib", "0.1", "--out", str(out)])
    assert p.returncode == 0, p.stderr[-2000:]
    row = json.loads(out.read_text())["rows"][0]
    assert row["full"] is None and row["full_predicted_gib"] > 0.1 and "limit" in row["full_skipped"]
    assert row["chunked"]["label_tokens"] > 0


def test_loss_memory_bad_arguments_one_line():
    p = _run(["benchmarks/loss_memory.py", "--lengths", "2k"])
    assert p.returncode != 0 and "Traceback" not in p.stderr and "--lengths" in p.stderr


@pytest.mark.slow
def test_train_speed_tiny_with_peers(tmp_path):
    """Every row kind (plain loop, HF Trainer x3, TRL packing, packtrain varlen and dense) runs on a
    1-layer model at 256/512 tokens; the JSON's ratios agree with its rates."""
    pytest.importorskip("trl")
    out = tmp_path / "ts.json"
    p = _run(["benchmarks/train_speed.py", "--size", "tiny", "--lengths", "256,512", "--trl-lengths", "256",
              "--timed-tokens", "256", "--max-steps", "2", "--rounds", "1", "--dense-max", "256",
              "--out", str(out)], timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    (size,) = r["sizes"]
    kinds = {row["kind"] for row in size["rows"]}
    assert kinds == {"unpacked", "padded", "hf_one", "hf_padded", "hf_flat", "trl", "varlen", "dense"}
    rows = {row["mode"]: row for row in size["rows"]}
    base = next(row for row in size["rows"] if row["kind"] == "unpacked")
    flat = next(row for row in size["rows"] if row["kind"] == "hf_flat")
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["tokens_per_cpu_s"] > 0 and row["steps"] >= 1
        assert row["x_unpacked"] == pytest.approx(row["tokens_per_s"] / base["tokens_per_s"])
        assert row["x_hf_flat"] == pytest.approx(row["tokens_per_s"] / flat["tokens_per_s"])
        for rnd in row["rounds"]:
            assert len(rnd["step_tokens"]) == rnd["steps"] == row["steps"]
    # a packed step holds at most max_length tokens and, the packs being full, most of it
    for row in rows.values():
        if row["kind"] in ("varlen", "dense"):
            assert 0.9 * row["max_length"] <= row["tokens_per_step"] <= row["max_length"]
        if row["kind"] == "trl":
            assert row["tokens_per_step"] <= row["max_length"]
        if row["kind"] == "hf_one":
            assert row["tokens_per_step"] < 256
    assert set(size["checks"]) >= {"longest_vs_shortest", "min_x_hf_flat", "min_x_trl"}
    # --combine merges runs into one result
    merged = tmp_path / "merged.json"
    p = _run(["benchmarks/train_speed.py", "--combine", str(out), str(out), "--out", str(merged)])
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(json.loads(merged.read_text())["sizes"]) == 2


@pytest.mark.slow
def test_pack_speed_quick_paired_medians(tmp_path):
    """pack_speed's headline ratios are medians of (bare tokenizer, pack-build) pairs run back to
    back: every pair's ratios agree with its two runs, the medians with the pairs, the median runs
    are runs that happened, and the 4x corpus is quoted against the chat corpus's bare tokenizer."""
    import statistics

    out = tmp_path / "ps.json"
    # two pairs: an even count, so the median run is the lower middle and the median ratio a mean
    p = _run(["benchmarks/pack_speed.py", "--quick", "--skip-trl", "--repeat", "2",
              "--workers", "1", "--out", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["repeat"] == 2
    assert "median of 2 paired runs" in p.stdout
    for name in ("chat", "alpaca"):
        c = r["corpora"][name]
        pairs = c["pairs"]
        assert len(pairs) == r["repeat"]
        for pr in pairs:
            b, pb = pr["bare"], pr["pack_build"]
            assert b["tokens_per_s"] > 0 and pb["tokens_per_s_build"] > pb["tokens_per_s_wall"] > 0
            assert pr["ratio_build"] == pytest.approx(pb["tokens_per_s_build"] / b["tokens_per_s"])
            assert pr["ratio_wall"] == pytest.approx(pb["tokens_per_s_wall"] / b["tokens_per_s"])
            assert pr["ratio_cpu"] == pytest.approx(pb["tokens_per_cpu_s"] / b["tokens_per_cpu_s"])
        # pack-build runs on jemalloc/mimalloc where installed; the bare tokenizer is measured
        # as shipped and on that allocator (the like-for-like ratio)
        alloc = r["allocator"]
        for pr in pairs:
            same = pr["bare_alloc"] if alloc else pr["bare"]
            assert pr["ratio_build_same_allocator"] == pytest.approx(
                pr["pack_build"]["tokens_per_s_build"] / same["tokens_per_s"])
            assert ("bare_alloc" in pr) == ("pack_build_system_malloc" in pr) == bool(alloc)
            if alloc:
                assert pr["ratio_build_system_malloc"] == pytest.approx(
                    pr["pack_build_system_malloc"]["tokens_per_s_build"] / pr["bare"]["tokens_per_s"])
                assert pr["pack_build_system_malloc"]["tokens"] == pr["pack_build"]["tokens"]
        for pr in pairs:  # the tokenize-only pipeline tokenizes exactly what pack-build does
            t = pr["tokenize_only"]
            assert t["tokens"] == pr["pack_build"]["tokenized"]
            assert 0 < t["load_s"] < t["seconds"]
            assert pr["ratio_build_over_tokenize_only"] == pytest.approx(
                pr["pack_build"]["tokens_per_s_build"] / t["tokens_per_s"])
        keys = ["build", "wall", "cpu", "build_same_allocator", "cpu_same_allocator",
                "tokenize_only_same_allocator", "build_over_tokenize_only"]
        for k in keys + (["build_system_malloc"] if alloc else []):
            assert c["ratio"][k] == pytest.approx(statistics.median(pr[f"ratio_{k}"] for pr in pairs))
        assert c["runs"]["bare_tokenizer"] == [pr["bare"]["tokens_per_s"] for pr in pairs]
        assert c["runs"]["pack_build"] == [pr["pack_build"]["tokens_per_s_build"] for pr in pairs]
        # the median run, lower middle of two: the slower one
        assert c["bare_tokenizer"] == min((pr["bare"] for pr in pairs), key=lambda x: x["tokens_per_s"])
        assert c["pack_build"] == min((pr["pack_build"] for pr in pairs),
                                      key=lambda x: x["tokens_per_s_build"])
        for pr in pairs:  # each pair also ran pack-build without fixed-text reuse
            assert pr["ratio_build_no_reuse"] == pytest.approx(
                pr["no_reuse"]["tokens_per_s_build"]
                / (pr["bare_alloc"] if alloc else pr["bare"])["tokens_per_s"])
            assert pr["no_reuse"]["tokens"] == pr["pack_build"]["tokens"]
        assert c["ratio"]["build_no_reuse"] == pytest.approx(
            statistics.median(pr["ratio_build_no_reuse"] for pr in pairs))
        assert "no fixed-text reuse" in p.stdout
        each = ", ".join(f"{pr['ratio_build']:.2f}" for pr in pairs)
        assert f"pairs (build ratio): {each} -> median {c['ratio']['build']:.2f}" in p.stdout
    chat = r["corpora"]["chat"]
    x4, base = chat["pack_build_x4"], chat["bare_tokenizer"]["tokens_per_s"]
    assert chat["ratio_x4"]["build"] > 0 and chat["ratio_x4"]["wall"] > 0
    assert chat["ratio_x4"]["build"] == pytest.approx(x4["tokens_per_s_build"] / base)
    assert chat["ratio_x4"]["wall"] == pytest.approx(x4["tokens_per_s_wall"] / base)
    assert "pack-build (1 workers), 4x corpus, in build" in p.stdout
    # the first build with the tokenizer is measured on its own, and builds the same dataset
    cold = chat["pack_build_cold"]
    assert (cold["tokens"], cold["packs"]) == (chat["pack_build"]["tokens"],
                                               chat["pack_build"]["packs"])
    assert "pack-build (1 workers), first build" in p.stdout


@pytest.mark.slow  # ~45 s alone on 2 cores (pack-build, three train-run start-ups, one compile); 250 s when busy
def test_gpu_check_train_run_cpu_smoke(tmp_path):
    """gpu_check.sh --cpu-smoke: pack-build, then train-run at ZeRO 2 and 3 on a tiny model and
    with --compile at ZeRO 2, the table printed and the JSON's rates those of the runs'
    metrics.jsonl."""
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-smoke"], cwd=ROOT, capture_output=True,
                       text=True, timeout=540, env={**os.environ, "OUT": str(tmp_path),
                                                    "PYTHON": PY})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.loads((tmp_path / "gpu_train_run.json").read_text())
    assert [(row["pack_size"], row["zero"], row["variant"]) for row in r["rows"]] == \
        [(256, 2, "base"), (256, 2, "compile"), (256, 3, "base")]
    for row in r["rows"]:
        run = tmp_path / "gpu_train_run_work" / ("run-tiny-256-z{zero}{v}".format(
            zero=row["zero"], v="" if row["variant"] == "base" else f"-{row['variant']}"))
        steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(steps) == row["steps"] == 3 and "mfu" not in row  # no MFU on CPU
        assert row["tokens_per_s"] == pytest.approx(statistics.median(s["tokens_per_s"] for s in steps[1:]))
    assert "train-run tok/s" in p.stdout and "n/a" in p.stdout
    log = (tmp_path / "gpu_train_run_work" / "run-tiny-256-z2-compile.log").read_text()
    assert "compile: 2 decoder layers" in log and "kernels: none (--kernels none)" in log


@pytest.mark.slow  # six processes (pack-build, 2 TRL, pack-ref, 2 train-run): 81 s alone, ~6 min on busy cores
def test_dpo_vs_trl_smoke(tmp_path):
    """Every row runs on the same pairs in the same steps (same real tokens per step), every row's
    first loss is ln 2 and the first steps' losses agree with TRL's, the rates and ratios in the
    JSON are those of the steps it timed, and both reference passes are reported."""
    import math

    pytest.importorskip("trl")
    out = tmp_path / "dpo.json"
    p = _run(["benchmarks/dpo_vs_trl.py", "--smoke", "--out", str(out)], timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["complete"] and r["rounds"] == 1
    rows = {row["kind"]: row for row in r["rows"]}
    assert set(rows) == {"trl", "trl_pre", "live", "stored"}
    trl = rows["trl"]
    for row in rows.values():
        assert row["same_tokens_as_trl"]
        assert abs(row["loss"][0] - math.log(2)) < 1e-6 and len(row["loss"]) == r["steps"]
        assert row["max_loss_diff_vs_trl"] < 1e-4
        assert row["x_trl"] == pytest.approx(row["pairs_per_s"] / trl["pairs_per_s"])
        (rnd,) = row["rounds"]
        timed = sum(rnd["step_s"][r["warmup"]:])
        assert row["tokens_per_s"] == pytest.approx(sum(rnd["step_tokens"][r["warmup"]:]) / timed)
        assert row["pairs_per_s"] == pytest.approx(sum(rnd["step_pairs"][r["warmup"]:]) / timed)
    assert rows["trl_pre"]["ref_pass_s"] > 0 and rows["stored"]["ref_pass_s"] > 0
    assert rows["trl"]["ref_pass_s"] is None and rows["live"]["ref_pass_s"] is None
    assert "pack-ref:" in rows["stored"]["rounds"][0]["pack_ref_summary"]
    assert "train-run dpo, stored ref" in p.stdout and "x TRL" in p.stdout
