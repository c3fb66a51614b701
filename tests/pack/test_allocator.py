"""pack-build's faster allocator (pack/allocator.py): which library it picks, when it
re-executes, that the re-executed process really runs on it and hides the preload from its
children, and that the shards do not depend on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pack.tokenize import allocator
from pack.errors import PacktrainError

ROOT = Path(__file__).resolve().parents[2]
REAL = allocator.find("auto")  # a jemalloc or mimalloc installed on this machine, if any
needs_real = pytest.mark.skipif(REAL is None, reason="no jemalloc or mimalloc installed "
                                                     "(Debian: apt-get install libjemalloc2)")


def _libs(tmp_path: Path, *names: str) -> Path:
    d = tmp_path / "lib"
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        (d / n).write_bytes(b"\x7fELF")
    return d


def test_find_prefers_jemalloc_then_mimalloc(tmp_path):
    d = _libs(tmp_path, "libmimalloc.so.2")
    assert allocator.find("auto", [d]) == str(d / "libmimalloc.so.2")
    _libs(tmp_path, "libjemalloc.so.2")
    assert allocator.find("auto", [d]) == str(d / "libjemalloc.so.2")
    assert allocator.find("mimalloc", [d]) == str(d / "libmimalloc.so.2")
    assert allocator.find("JEMALLOC", [d]) == str(d / "libjemalloc.so.2")
    assert allocator.find("auto", [tmp_path / "empty"]) is None  # none: the system's
    for off in ("system", "off", "0"):
        assert allocator.find(off, [d]) is None


def test_find_refuses_what_it_cannot_use(tmp_path):
    with pytest.raises(PacktrainError, match=r"PACKTRAIN_ALLOCATOR=jemalloc: libjemalloc.so.2 "
                                             r"not found .*install it"):
        allocator.find("jemalloc", [tmp_path])
    with pytest.raises(PacktrainError, match=r"apt-get install libmimalloc2\.0\)"):
        allocator.find("mimalloc", [tmp_path])  # Debian's package name, not lib<name>2
    with pytest.raises(PacktrainError, match="choose auto, system, jemalloc, mimalloc"):
        allocator.find("tcmalloc", [tmp_path])
    with pytest.raises(PacktrainError, match="no such file"):
        allocator.find(str(tmp_path / "libnothere.so"), [tmp_path])
    lib = tmp_path / "custom.so"
    lib.write_bytes(b"")
    assert allocator.find(str(lib), []) == str(lib)


def test_plan(tmp_path):
    d = _libs(tmp_path, "libjemalloc.so.2")
    lib = str(d / "libjemalloc.so.2")
    env = allocator.plan({"PATH": "/bin"}, "linux", [d])
    assert env["LD_PRELOAD"] == lib and env["PATH"] == "/bin"
    assert env[allocator._MARK] == lib and allocator._PREV not in env
    # a preload the user already has is kept, after ours, and restored later
    env = allocator.plan({"LD_PRELOAD": "/x/libfoo.so"}, "linux", [d])
    assert env["LD_PRELOAD"] == f"{lib}:/x/libfoo.so"
    assert env[allocator._PREV] == "/x/libfoo.so"
    # no re-execution: already re-executed, not Linux, system chosen, none found, one preloaded
    assert allocator.plan({allocator._MARK: lib}, "linux", [d]) is None
    assert allocator.plan({}, "darwin", [d]) is None
    assert allocator.plan({allocator.ENV: "system"}, "linux", [d]) is None
    assert allocator.plan({}, "linux", [tmp_path / "empty"]) is None
    assert allocator.plan({"LD_PRELOAD": "/usr/lib/libmimalloc.so.2"}, "linux", [d]) is None
    spaced = _libs(tmp_path / "a b", "libjemalloc.so.2")  # LD_PRELOAD cannot name it
    assert allocator.plan({}, "linux", [spaced]) is None


PROBE = ("import json, os, sys; from pack.tokenize import allocator; allocator.reexec(); "
         "print(json.dumps({'active': allocator.active(), 'preload': os.environ.get('LD_PRELOAD'),"
         " 'mark': os.environ.get(allocator._MARK), 'argv': sys.argv[1:],"
         " 'exe': sys.executable}))")


def _probe(env_extra: dict, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", allocator.ENV, allocator._MARK, allocator._PREV)}
    env.update(env_extra)
    p = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@needs_real
def test_reexec_runs_on_the_allocator_and_hides_the_preload():
    out = _probe({}, "a b", "--flag")
    assert out["active"] in allocator.LIBRARIES  # mapped into the process: really loaded
    assert out["preload"] is None and out["mark"] is None  # children do not inherit it
    assert out["argv"] == ["a b", "--flag"]
    assert out["exe"] == sys.executable  # the same interpreter, so the same environment
    keep = _probe({"LD_PRELOAD": ""})
    assert keep["active"] in allocator.LIBRARIES and keep["preload"] == ""
    assert _probe({allocator.ENV: "system"})["active"] is None


def test_no_reexec_without_a_library(tmp_path, monkeypatch):
    monkeypatch.setattr(allocator, "_search_dirs", lambda: [tmp_path])
    monkeypatch.delenv(allocator._MARK, raising=False)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-executed"))
    allocator.reexec()  # returns: carries on in this process
    monkeypatch.setenv(allocator.ENV, "jemalloc")
    with pytest.raises(PacktrainError, match="not found"):
        allocator.reexec()


def test_reexec_restores_the_users_preload(monkeypatch):
    monkeypatch.setenv(allocator._MARK, "/x/libjemalloc.so.2")
    monkeypatch.setenv(allocator._PREV, "/x/libfoo.so")
    monkeypatch.setenv("LD_PRELOAD", "/x/libjemalloc.so.2:/x/libfoo.so")
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-executed twice"))
    allocator.reexec()
    assert os.environ["LD_PRELOAD"] == "/x/libfoo.so"
    assert allocator._MARK not in os.environ and allocator._PREV not in os.environ


def test_named_allocator_missing_is_a_one_line_error(tmp_path, alpaca_jsonl, tokenizer_dir):
    env = dict(os.environ, PACKTRAIN_ALLOCATOR="tcmalloc")
    p = subprocess.run([sys.executable, "-m", "pack.cli", "build", "--tokenizer",
                        str(tokenizer_dir), str(alpaca_jsonl), str(tmp_path / "out")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "error: PACKTRAIN_ALLOCATOR=tcmalloc: choose auto, system, jemalloc, mimalloc or a "
        "path to a shared library"]
    assert not (tmp_path / "out").exists()


@needs_real
def test_pack_build_on_the_allocator_writes_the_same_bytes(tmp_path, alpaca_jsonl,
                                                           tokenizer_dir):
    outs = {}
    for choice in ("auto", "system"):
        out = tmp_path / choice
        env = dict(os.environ, PACKTRAIN_ALLOCATOR=choice)
        env.pop("LD_PRELOAD", None)
        p = subprocess.run([str(Path(sys.executable).parent / "pack-build"), "--tokenizer", str(tokenizer_dir), "--workers", "2",
                            str(alpaca_jsonl), str(out)], env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        line = [x for x in p.stderr.splitlines() if x.startswith("allocator")]
        outs[choice] = (out, line)
    name = allocator.name_in(Path(REAL).name)
    assert outs["auto"][1] == [f"allocator       {name}"]
    assert outs["system"][1] == ["allocator       system malloc"]
    shards = sorted(p.name for p in outs["auto"][0].glob("shard-*.arrow"))
    assert shards
    for name in shards:
        assert (outs["auto"][0] / name).read_bytes() == (outs["system"][0] / name).read_bytes()
