"""User errors end in one `error:` line and a non-zero exit, never a traceback; interrupted
builds leave no manifest behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pack import format as F
from pack.cli import build_main, info_main

BIN = Path(sys.executable).parent


def command(name: str) -> list[str]:
    """The installed console script, or the module dispatch when it is not installed."""
    script = BIN / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "pack.cli", name.split("-", 1)[1]]


def pack_build(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "PACKTRAIN_TOKENIZER"}
    e.update(env or {})
    return subprocess.run(command("pack-build") + [str(a) for a in args], capture_output=True,
                          text=True, env=e, timeout=timeout)


def assert_user_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def alpaca_lines(alpaca_jsonl) -> list[str]:
    return open(alpaca_jsonl).read().splitlines()[:60]


def write_lines(path: Path, lines: list[str] | bytes) -> Path:
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- subprocesses

def test_malformed_json_line(tmp_path, tokenizer_dir, alpaca_lines):
    lines = list(alpaca_lines)
    lines[36] = lines[36][:-5]  # line 37 cut short
    src = write_lines(tmp_path / "bad.jsonl", lines)
    r = pack_build("--quiet", "--tokenizer", tokenizer_dir, src, tmp_path / "out")
    line = assert_user_error(r, f"{src}:37", "JSON")
    assert r.stderr.strip() == line  # quiet: the error is all there is
    assert not (tmp_path / "out" / F.MANIFEST).exists()


def test_wrong_type_and_missing_field(tmp_path, tokenizer_dir, alpaca_lines):
    lines = list(alpaca_lines)
    rec = json.loads(lines[19])
    rec["output"] = 5
    lines[19] = json.dumps(rec)
    rec = json.loads(lines[41])
    del rec["output"]
    lines[41] = json.dumps(rec)
    src = write_lines(tmp_path / "types.jsonl", lines)
    # without --quiet too: progress bars may be on stderr, the error is still one line
    r = pack_build("--tokenizer", tokenizer_dir, "--workers", "1", src, tmp_path / "out")
    assert_user_error(r, f"{src}:20", "output", "string")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    lines[19] = alpaca_lines[19]
    src = write_lines(tmp_path / "missing.jsonl", lines)
    r = pack_build("--quiet", "--tokenizer", tokenizer_dir, src, tmp_path / "out")
    assert_user_error(r, f"{src}:42", "output", "missing")


def test_empty_file(tmp_path, tokenizer_dir):
    src = write_lines(tmp_path / "empty.jsonl", b"")
    r = pack_build("--quiet", "--tokenizer", tokenizer_dir, src, tmp_path / "out")
    assert_user_error(r, str(src), "empty")


def test_invalid_utf8(tmp_path, tokenizer_dir, alpaca_lines):
    data = ("\n".join(alpaca_lines[:5]) + "\n").encode()
    data += b'{"instruction": "caf\xe9", "output": "x"}\n'
    src = write_lines(tmp_path / "latin1.jsonl", data)
    r = pack_build("--quiet", "--tokenizer", tokenizer_dir, src, tmp_path / "out")
    assert_user_error(r, f"{src}:6", "UTF-8")


def test_unreadable_tokenizer(tmp_path, alpaca_lines):
    src = write_lines(tmp_path / "ok.jsonl", alpaca_lines[:5])
    bad = tmp_path / "tok"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    (bad / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    r = pack_build("--quiet", "--tokenizer", bad, src, tmp_path / "out")
    assert_user_error(r, str(bad), "tokenizer")
    r = pack_build("--quiet", src, tmp_path / "out")  # none given, none in the environment
    assert_user_error(r, "--tokenizer", "PACKTRAIN_TOKENIZER")


def test_non_empty_output_and_missing_input(tmp_path, tokenizer_dir, alpaca_lines):
    src = write_lines(tmp_path / "ok.jsonl", alpaca_lines[:5])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = pack_build("--quiet", "--tokenizer", tokenizer_dir, src, out)
    assert_user_error(r, str(out), "--overwrite")
    assert (out / "keep.txt").read_text() == "x"
    r = pack_build("--quiet", "--tokenizer", tokenizer_dir, tmp_path / "nope.jsonl",
                   tmp_path / "o2")
    assert_user_error(r, "nope.jsonl")
    r = pack_build("--quiet", "--tokenizer", tokenizer_dir, str(tmp_path / "*.parquet"),
                   tmp_path / "o2")
    assert_user_error(r, "*.parquet")
    assert not (tmp_path / "o2").exists()


def test_info_and_verify_user_errors(tmp_path):
    for cmd in ("pack-info", "pack-verify"):
        r = subprocess.run(command(cmd) + [str(tmp_path / "none")], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode in (1, 2) and "Traceback" not in r.stderr
        assert "none" in r.stdout + r.stderr


def test_sigint_midway_leaves_no_manifest(tmp_path, tokenizer_dir, chat_jsonl):
    src = tmp_path / "big.jsonl"
    text = open(chat_jsonl).read()
    src.write_text(text * 15)  # 3,000 conversations: a build of many seconds
    out = tmp_path / "out"
    p = subprocess.Popen(command("pack-build") + ["--tokenizer", str(tokenizer_dir), "--workers",
                                                  "2", "--max-length", "1024", str(src),
                                                  str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / ".packtrain-samples.tmp.arrow").exists():
        if p.poll() is not None:
            break
        time.sleep(0.02)
    assert p.poll() is None, "the build ended before it could be interrupted"
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("error:")]
    assert not (out / F.MANIFEST).exists()
    assert not out.exists() or list(out.iterdir()) == []


# ---------------------------------------------------------------- in-process

def test_skip_invalid_counts(tmp_path, tokenizer_dir, alpaca_lines):
    lines = list(alpaca_lines)
    lines[10] = lines[10][:20]                        # invalid JSON
    lines[11] = "[1, 2]"                              # not an object
    rec = json.loads(lines[12])
    rec["instruction"] = ["not", "a", "string"]       # wrong type: invalid record
    lines[12] = json.dumps(rec)
    data = ("\n".join(lines) + "\n").encode()
    data += b'{"instruction": "\xff", "output": "y"}\n'  # invalid UTF-8
    src = write_lines(tmp_path / "mixed.jsonl", data)
    out = tmp_path / "out"
    assert build_main(["--quiet", "--skip-invalid", "--tokenizer", str(tokenizer_dir),
                       "--workers", "1", str(src), str(out)]) == 0
    m = F.read_manifest(out)
    s = m["stats"]
    assert s["skipped_invalid"] == {"invalid-json": 1, "not-an-object": 1, "invalid-utf8": 1,
                                    "invalid-record": 1}
    assert s["records"] == 58 == m["sources"][0]["records"]
    assert s["samples_packed"] == 57
    assert F.verify(out) == []


def test_empty_responses_dropped_and_counted(tmp_path, tokenizer_dir, alpaca_lines, capsys):
    lines = list(alpaca_lines)
    for i in (3, 30):
        rec = json.loads(lines[i])
        rec["output"] = "  "
        lines[i] = json.dumps(rec)
    src = write_lines(tmp_path / "empty-out.jsonl", lines)
    out = tmp_path / "out"
    assert build_main(["--tokenizer", str(tokenizer_dir), "--workers", "1", str(src),
                       str(out)]) == 0
    err = capsys.readouterr().err
    assert "empty-response 2" in err and "samples packed  58" in err
    m = F.read_manifest(out)
    assert m["stats"]["dropped"] == {"empty-response": 2}
    sample_index = {int(i) for row in F.PackedDataset(out) for i in row["sample_index"]}
    assert 3 not in sample_index and 30 not in sample_index and len(sample_index) == 58
    assert info_main([str(out)]) == 0
    info = capsys.readouterr().out
    assert "empty-response 2" in info and m["tokenizer"]["fingerprint"] in info


def test_interrupted_writer_leaves_no_manifest(tmp_path, tokenizer_dir, alpaca_lines,
                                               monkeypatch, capsys):
    src = write_lines(tmp_path / "ok.jsonl", alpaca_lines)
    out = tmp_path / "out"
    args = ["--quiet", "--tokenizer", str(tokenizer_dir), "--workers", "1", "--max-length",
            "128", "--shard-size", "3", str(src), str(out)]
    assert build_main(args) == 0  # a complete dataset first; the rebuild then fails midway
    assert F.verify(out) == []
    calls = {"n": 0}
    real_add = F.ShardWriter.add_batch

    def add(self, *a, **kw):  # a record batch of 3 packs: one shard each
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_add(self, *a, **kw)

    monkeypatch.setattr(F.ShardWriter, "add_batch", add)
    assert build_main(args + ["--overwrite"]) == 130
    assert calls["n"] == 3
    assert "error:" in capsys.readouterr().err
    assert not (out / F.MANIFEST).exists()
    assert not out.exists() or list(out.iterdir()) == []

    def broken(self, *a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(F.ShardWriter, "add_batch", broken)
    assert build_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "No space left on device" in err
    assert not out.exists() or list(out.iterdir()) == []


def test_plot(tmp_path, tokenizer_dir, alpaca_lines, capsys):
    pytest.importorskip("matplotlib")
    src = write_lines(tmp_path / "ok.jsonl", alpaca_lines[:30])
    out = tmp_path / "out"
    assert build_main(["--quiet", "--tokenizer", str(tokenizer_dir), "--workers", "1",
                       str(src), str(out)]) == 0
    png = tmp_path / "h.png"
    assert info_main([str(out), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sample lengths" in capsys.readouterr().out
    assert info_main([str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == F.read_manifest(out)
