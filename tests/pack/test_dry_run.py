"""pack-build --dry-run: exact record counts and sha256, an honest estimate, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pack import format as F
from pack.build import build
from pack.cli import build_main
from pack.dry_run import SAMPLE, _Spread


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            st = p.stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def dry(capsys, *argv) -> tuple[int, str, str]:
    rc = build_main([*map(str, argv), "--dry-run", "--workers", "1"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_spread_sample_covers_the_stream():
    s = _Spread(8)
    for i in range(1000):
        s.offer(i, lambda i=i: i)
    assert 8 <= len(s.items) < 16
    gaps = {b - a for a, b in zip(s.items, s.items[1:])}
    assert len(gaps) == 1 and s.items[0] == 0 and s.items[-1] >= 1000 - 2 * gaps.pop()


def test_dry_run_reports_and_writes_nothing(tokenizer_dir, chat_jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    before = tree(tmp_path)
    rc, text, _ = dry(capsys, "--tokenizer", tokenizer_dir, "--max-length", 512, chat_jsonl, out)
    assert rc == 0
    assert tree(tmp_path) == before and not out.exists()
    assert "nothing was written" in text and "(an estimate, not a count)" in text
    assert f"{chat_jsonl}  200 records, sha256 {F.file_sha256(chat_jsonl)}" in text
    assert "format           messages" in text and "template         chat" in text
    assert f"output           {out} (would be created)" in text
    assert "max_length       512" in text and "bfd, seed 0" in text

    # fewer records than the sample: every record is rendered, so the "estimate" is exact
    plan = build(dict(inputs=[str(chat_jsonl)], out=str(out), tokenizer=str(tokenizer_dir),
                      max_length=512, workers=1, quiet=True, dry_run=True))
    assert not out.exists()
    real = build(dict(inputs=[str(chat_jsonl)], out=str(out), tokenizer=str(tokenizer_dir),
                      max_length=512, workers=1, quiet=True))["stats"]
    e = plan["estimate"]
    assert e["sampled_records"] == 200 < SAMPLE
    assert (e["samples"], e["tokens"], e["label_tokens"], e["truncated"]) == \
        (real["samples_packed"], real["tokens"], real["label_tokens"], real["truncated"])
    assert e["packs_lower_bound"] == real["lower_bound"]
    assert plan["tokenizer"]["fingerprint"] == json.loads(
        (out / F.MANIFEST).read_text())["tokenizer"]["fingerprint"]

    # into an existing dataset with --overwrite: reported, left untouched
    before = tree(out)
    rc, text, _ = dry(capsys, "--tokenizer", tokenizer_dir, chat_jsonl, out, "--overwrite")
    assert rc == 0 and "would be replaced (--overwrite)" in text
    assert tree(out) == before


def test_dry_run_estimate_from_a_sample(tokenizer_dir, tmp_path):
    """More records than the sample: counts stay exact, tokens land in the stated interval."""
    from pack.offline import chitchat_conversations

    path = tmp_path / "text.jsonl"
    n = 0
    with open(path, "w") as f:
        for rec in chitchat_conversations(limit=400):
            for m in rec["messages"]:
                f.write(json.dumps({"text": m["content"]}) + "\n")
                n += 1
    assert n > 4 * SAMPLE
    args = dict(inputs=[str(path)], out=str(tmp_path / "o"), tokenizer=str(tokenizer_dir),
                max_length=256, workers=1, quiet=True)
    plan = build({**args, "dry_run": True})
    real = build(args)["stats"]
    e = plan["estimate"]
    assert plan["records"] == real["records"] == n
    assert plan["sources"][0]["records"] == n and e["sampled_records"] == SAMPLE
    lo, hi = e["tokens_95pct"]
    assert lo <= real["tokens"] <= hi
    assert abs(e["tokens"] - real["tokens"]) < 0.1 * real["tokens"]


def test_dry_run_errors_as_a_real_build(tokenizer_dir, chat_jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    rc, _, err = dry(capsys, "--tokenizer", tokenizer_dir, chat_jsonl, out)
    assert rc == 2 and "not empty" in err and err.count("\n") == 1

    bad = tmp_path / "bad.jsonl"
    lines = chat_jsonl.read_text().splitlines()
    lines[150] = lines[150][:-3]
    bad.write_text("\n".join(lines) + "\n")
    before = tree(tmp_path)
    rc, _, err = dry(capsys, "--tokenizer", tokenizer_dir, bad, tmp_path / "o2")
    assert rc == 2 and f"{bad}:151: invalid JSON" in err and err.count("\n") == 1
    rc, text, _ = dry(capsys, "--tokenizer", tokenizer_dir, bad, tmp_path / "o2",
                      "--skip-invalid")
    assert rc == 0 and "records          199; skipped invalid: invalid-json 1" in text
    rc, _, err = dry(capsys, "--tokenizer", tokenizer_dir, tmp_path / "missing.jsonl",
                     tmp_path / "o2")
    assert rc == 2 and "missing.jsonl: no such file" in err
    assert tree(tmp_path) == before


def test_dry_run_of_a_partition(tokenizer_dir, alpaca_jsonl, tmp_path, capsys):
    rc, text, _ = dry(capsys, "--tokenizer", tokenizer_dir, alpaca_jsonl, tmp_path / "o",
                      "--num-partitions", 2, "--partition", 1)
    n = len(alpaca_jsonl.read_text().splitlines())
    assert rc == 0 and f"in partition 1 of 2 ({n:,} in all)" in text
    assert not (tmp_path / "o").exists()


def test_dry_run_command_line(tokenizer_dir, alpaca_jsonl, tmp_path):
    exe = Path(sys.executable).parent / "pack-build"
    r = subprocess.run([str(exe), "--tokenizer", str(tokenizer_dir), "--dry-run",
                        str(alpaca_jsonl), str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    n = len(alpaca_jsonl.read_text().splitlines())
    assert f"records          {n}" in r.stdout and "format           alpaca" in r.stdout
    assert not (tmp_path / "o").exists()
