"""Smoke runs of the training benchmarks at minimal sizes, so the scripts do not rot: they run end to
end, write their JSON, and the numbers they report are consistent with what they measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
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
