"""train-run's progress (train.loop.Progress): the live bar shows tqdm's ETA and keeps the last
evaluation's loss between evaluations (tests/train/test_eval.py checks the plain lines of a
real run)."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

from train.loop import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_keeps_the_last_eval_loss_and_shows_the_time_left(tmp_path, monkeypatch):
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    run = SimpleNamespace(dist=SimpleNamespace(is_main=True), out=tmp_path, total_steps=6, step=0,
                          args=SimpleNamespace(log_every=1, report_to=None))
    progress = Progress(run)
    progress.log({"step": 0, "epoch": 0, "eval_loss": 5.5, "eval_tokens": 9}, 0.0)
    assert "eval_loss=5.5000" in progress.bar.postfix
    postfixes = []
    for step in (1, 2, 3):
        run.step = step
        m = {"step": step, "loss": 4.0 - step, "lr": 1e-3, "tokens_per_s": 100.0}
        if step == 2:
            m["eval_loss"] = 4.25
        progress.log(m, 0.0)
        postfixes.append(progress.bar.postfix)
    assert "eval_loss=5.5000" in postfixes[0] and "loss=3.0000" in postfixes[0]
    assert "eval_loss=4.2500" in postfixes[1] and "eval_loss=4.2500" in postfixes[2]
    shown = str(progress.bar)
    assert "3/6" in shown and "eval_loss=4.2500" in shown and "<?" not in shown  # an ETA
    progress.close()
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2, 3]  # metrics.jsonl as before: what was logged
    assert [m.get("eval_loss") for m in lines] == [5.5, None, 4.25, None]
