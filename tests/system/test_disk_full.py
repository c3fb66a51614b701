"""A full output disk ends pack-build with one clear line and leaves nothing behind.

Two ways to run out of space, at two points of the build each (while the temporary sample
store is written, and while shards are written):

* a small tmpfs mounted by the test (needs root and permission to mount; skipped, saying why,
  where the machine forbids it): ENOSPC, "no space left on device";
* a file-size limit (RLIMIT_FSIZE with SIGXFSZ ignored, so writes fail with EFBIG instead of
  killing the process), which needs no privilege and so runs everywhere.

Each must exit 2 with one line naming the output path and the cause, no traceback, no
manifest.json and no temporary or partial files; after space is freed the same command works.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pack.cli import build_main, verify_main


@pytest.fixture(scope="module")
def sizes(tmp_path_factory, chat_jsonl, tokenizer_dir) -> dict[str, int]:
    """Bytes of the temporary sample store and of the shards of the build used below."""
    from pack.format import read_manifest

    out = tmp_path_factory.mktemp("size") / "out"
    assert build_main(argv(chat_jsonl, out, tokenizer_dir)) == 0
    m = read_manifest(out)
    shards = [s["bytes"] for s in m["shards"]]
    # the store holds input_ids and labels (int32) plus offsets; bound it from the token count
    store = 8 * m["stats"]["tokens"]
    return {"store": store, "shards": sum(shards), "largest_shard": max(shards)}


def argv(corpus: Path, out: Path, tok: Path, *extra: str) -> list[str]:
    return [str(corpus), str(out), "--tokenizer", str(tok), "--max-length", "512",
            "--workers", "1", "--quiet", *extra]


def assert_clean_failure(err: str, out: Path, cause: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(out) in lines[0] and cause in lines[0].lower(), lines[0]
    left = os.listdir(out) if out.exists() else []
    assert left == [], left  # no manifest, no shard, no temporary file


# ---------------------------------------------------------------- tmpfs (ENOSPC)

@pytest.fixture
def small_fs(tmp_path):
    """Mount a tmpfs of a given size at tmp_path/fs; skip where mounting is not allowed."""
    mounts: list[Path] = []

    def mount(size: int) -> Path:
        d = tmp_path / f"fs{len(mounts)}"
        d.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root; the RLIMIT_FSIZE tests cover "
                        "this machine")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); the "
                        f"RLIMIT_FSIZE tests cover this machine")
        mounts.append(d)
        return d

    yield mount
    for d in mounts:
        subprocess.run(["umount", str(d)], check=False)


@pytest.mark.parametrize("phase", ["store", "shards"])
@pytest.mark.parametrize("precreated", [False, True], ids=["new-dir", "existing-dir"])
def test_full_tmpfs(phase, precreated, small_fs, sizes, chat_jsonl, tokenizer_dir, capsys):
    # "store": not even the temporary samples fit; "shards": they fit, the shards do not
    size = sizes["store"] // 2 if phase == "store" else sizes["store"] + sizes["shards"] // 2
    fs = small_fs(size)
    out = fs / "out"
    if precreated:
        out.mkdir()
    capsys.readouterr()
    assert build_main(argv(chat_jsonl, out, tokenizer_dir)) == 2
    assert_clean_failure(capsys.readouterr().err, out, "no space left on device")
    assert out.exists() == precreated
    assert os.listdir(fs) == (["out"] if precreated else [])


def test_full_tmpfs_then_space_freed(small_fs, sizes, chat_jsonl, tokenizer_dir, capsys):
    fs = small_fs(sizes["store"] + sizes["shards"] // 2)
    out = fs / "out"
    assert build_main(argv(chat_jsonl, out, tokenizer_dir)) == 2
    # the same command, after the user frees space (remounted bigger)
    subprocess.run(["mount", "-o", f"remount,size={4 * (sizes['store'] + sizes['shards'])}",
                    str(fs)], check=True)
    capsys.readouterr()
    assert build_main(argv(chat_jsonl, out, tokenizer_dir)) == 0
    assert verify_main([str(out), "--quiet"]) == 0


# ---------------------------------------------------------------- RLIMIT_FSIZE (EFBIG)

def _limit_file_size(limit: int):
    def preexec() -> None:
        # without this the kernel kills the writer with SIGXFSZ instead of failing the write
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["store", "shards"])
def test_file_size_limit(phase, sizes, chat_jsonl, tokenizer_dir, tmp_path):
    """No privilege needed. "shards": one big shard (--shard-size 1GB) is larger than the
    sample store, so a limit between the two lets the store through and stops the shard."""
    limit = sizes["store"] // 2 if phase == "store" else \
        (sizes["store"] + sizes["shards"]) // 2
    assert phase == "store" or sizes["store"] < limit < sizes["shards"]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pack.cli", "build",
           *argv(chat_jsonl, out, tokenizer_dir, "--shard-size", "1GB")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       preexec_fn=_limit_file_size(limit),
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2, r.stderr
    assert_clean_failure(r.stderr, out, "file too large")
    assert not out.exists()
