"""train.demo: the pieces fast, the whole `make demo` (small configuration) slow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train import demo

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from train.tiny import make_tiny_model

    return make_tiny_model("qwen3", None, tmp_path_factory.mktemp("m") / "model", vocab_size=300,
                           hidden=16, layers=1, heads=2, kv_heads=1)


def _sample(rng, n, prompt):
    ids = rng.integers(0, 300, size=n).astype(np.int32)
    labels = ids.copy()
    labels[:prompt] = -100
    return ids, labels


def test_loss_on_packs_equals_samples_one_by_one(tiny_dir):
    """The demo's scorer: a pack of two samples scores what the two samples score alone
    (block-diagonal attention from position_ids), normalised over all label tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(0)
    (a, la), (b, lb) = _sample(rng, 13, 4), _sample(rng, 9, 3)
    pack = {"input_ids": np.concatenate([a, b]), "labels": np.concatenate([la, lb]),
            "position_ids": np.concatenate([np.arange(13), np.arange(9)]).astype(np.int32)}
    got = demo._loss_on(tiny_dir, [pack], [0])

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    total = count = 0
    with torch.no_grad():
        for ids, lab in ((a, la), (b, lb)):
            n = int((lab[1:] != -100).sum())
            out = model(input_ids=torch.tensor(ids[None], dtype=torch.long),
                        labels=torch.tensor(lab[None], dtype=torch.long), use_cache=False)
            total += float(out.loss) * n
            count += n
    assert got == pytest.approx(total / count, abs=1e-5)


def test_last_step_packs(tmp_path):
    (tmp_path / "packs-rank0.jsonl").write_text(
        json.dumps({"step": 1, "micro": [[4]]}) + "\n" + json.dumps({"step": 2, "micro": [[7], [1]]}))
    (tmp_path / "packs-rank1.jsonl").write_text(json.dumps({"step": 2, "micro": [[3]]}) + "\n")
    assert sorted(demo._last_step_packs(tmp_path, 2)) == [1, 3, 7]
    assert demo._last_step_packs(tmp_path, 9) is None
    assert demo._last_step_packs(tmp_path / "missing", 2) is None


def test_failing_command_stops_with_its_log(tmp_path, capsys):
    d = demo.Demo(tmp_path, demo.SMALL)
    d.step_no = 3
    with pytest.raises(demo.DemoError) as e:
        d.run("boom", [sys.executable, "-c", "print('hello'); import sys; sys.exit(3)"])
    msg = str(e.value)
    assert "boom failed (exit code 3)" in msg and "hello" in msg
    assert "hello" in (tmp_path / "logs" / "03-boom.log").read_text().splitlines()


def test_tools_resolve():
    for cmd in (demo.PACK_BUILD, demo.PACK_INFO, demo.PACK_VERIFY, demo.TRAIN_RUN,
                demo.TRAIN_EXPORT):
        assert Path(cmd[0]).exists()


@pytest.mark.slow
def test_demo_small_end_to_end(tmp_path):
    """`python -m train.demo --small`: 2 ranks, ZeRO-3; the export reloads and reproduces the
    trainer's logged loss."""
    work = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "train.demo", "--small", "--workdir", str(work)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    out = r.stdout
    for n in range(1, 8):
        assert f"== [{n}/7]" in out
    assert "OK: the exported weights reproduce the trainer's loss" in out
    assert "== summary" in out

    import torch
    from transformers import AutoModelForCausalLM

    from pack.format import PackedDataset

    exp = work / "run" / "export"
    model = AutoModelForCausalLM.from_pretrained(str(exp), dtype=torch.float32)
    info = json.loads((exp / "packtrain_export.json").read_text())
    assert info["kind"] == "full" and info["step"] in (None, 3)
    ds = PackedDataset(work / "packed")
    loss = demo._loss_on(exp, ds, [0, 1])
    assert np.isfinite(loss) and 5 < loss < 15
    assert model.config.vocab_size == json.loads((work / "model" / "config.json").read_text())[
        "vocab_size"]
