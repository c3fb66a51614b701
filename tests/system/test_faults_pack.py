"""A killed pack-build loses nothing: SIGKILL a real build at many points of its run; what it
leaves is never a dataset (no manifest), pack-verify and train-run refuse it with one line, and
rerunning the same command cleans the leftovers and gives the same bytes as an uninterrupted
build. Also: leftovers never look complete, workers die with their parent, foreign files and
finished datasets are never deleted without --overwrite, and a live build is never disturbed.

Kill points are placed by phase, from a reference run's timeline: before the output directory
exists, during reading/tokenizing (the temporary sample store), and while shards, the card and
the manifest are written. The phase each kill hit is read back from the files it left.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pack import outdir as O
from pack.cli import build_main, verify_main
from pack.format import MANIFEST
from pack.stats import TIMING_FIELDS

TIMING = TIMING_FIELDS
PHASE_ORDER = ("absent", "empty", "tokenize", "write", "card", "finished")
TRIGGER_PREFIXES = {"shard": (".shard-", "shard-"), "card": (O.CARD, f".{O.CARD}.tmp-")}
RESULTS: dict[str, list] = collections.defaultdict(list)  # workers -> [(trigger, phase)]


# ---------------------------------------------------------------- helpers

def argv_for(corpus: Path, out: Path, tok: Path, workers: int) -> list[str]:
    return [str(corpus), str(out), "--tokenizer", str(tok), "--max-length", "1024",
            "--workers", str(workers), "--shard-size", "2", "--quiet"]


def digest(out: Path) -> dict[str, str]:
    """sha256 of every file of a dataset; the manifest's without the timing stats (the only
    fields that legitimately differ between equal builds)."""
    d = {}
    for p in sorted(out.iterdir()):
        data = p.read_bytes()
        if p.name == MANIFEST:
            m = json.loads(data)
            for k in TIMING:
                m["stats"].pop(k)
            data = json.dumps(m, sort_keys=True).encode()
        d[p.name] = hashlib.sha256(data).hexdigest()
    return d


def phase_of(out: Path) -> str:
    if not out.exists():
        return "absent"
    names = set(os.listdir(out))
    if not names:
        return "empty"
    if MANIFEST in names:
        return "finished"
    if O.CARD in names or any(n.startswith(f".{O.CARD}.tmp-") for n in names):
        return "card"
    if any(n.startswith(("shard-", ".shard-")) for n in names):
        return "write"
    return "tokenize"


def live_in_group(pgid: int) -> list[int]:
    """Processes of process group `pgid` that are still running (zombies do not count: they
    wait only for init to reap them)."""
    alive = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(d.name))
    return alive


def wait_no_orphans(pgid: int, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := live_in_group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return alive


def fork_build(argv: list[str]) -> int:
    """pack-build in a forked child in a session of its own (the tokenizer already loaded in
    this process is inherited, so the child starts at once); returns its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        rc = 3
        try:
            os.setsid()
            # tqdm's write lock is a multiprocessing lock shared with this test process: a child
            # SIGKILLed while holding it would leave every later progress bar here waiting
            # forever. The child gets a lock of its own.
            from tqdm import tqdm

            tqdm.set_lock(threading.RLock())
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            rc = build_main(argv)
        finally:
            os._exit(rc)
    return pid


def timeline(argv: list[str], out: Path) -> dict[str, float]:
    """Seconds from start until the output directory appears, the first shard file appears,
    and the build ends (uninterrupted)."""
    t0 = time.perf_counter()
    pid = fork_build(argv)
    seen: dict[str, float] = {}
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        now = time.perf_counter() - t0
        if out.is_dir():
            seen.setdefault("dir", now)
            if any(n.startswith((".shard-", "shard-")) for n in os.listdir(out)):
                seen.setdefault("shard", now)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            seen["end"] = now
            return seen
        time.sleep(0.002)


def kill_at(argv: list[str], out: Path, trigger: str, delay: float) -> tuple[bool, int]:
    """Start a build, wait for `trigger` ("start"; "dir": the output directory exists; "shard":
    a shard file exists; "card": the card is being written), then `delay` seconds, then
    SIGKILL it. Returns (killed while running, its pid = process group)."""
    pid = fork_build(argv)
    t_end = time.monotonic() + 120
    while trigger != "start" and time.monotonic() < t_end:
        if out.is_dir() and (trigger == "dir" or any(
                n.startswith(TRIGGER_PREFIXES[trigger]) for n in os.listdir(out))):
            break
        if os.waitpid(pid, os.WNOHANG)[0]:
            return False, pid
        time.sleep(0.002)
    time.sleep(delay)
    running = os.waitpid(pid, os.WNOHANG)[0] == 0
    if running:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        # Alive but past writing its manifest (closing summary, exit): the build won the race,
        # and the caller checks the finished dataset like any other completed build.
        running = not (out / MANIFEST).exists()
    return running, pid


def assert_not_a_dataset(out: Path, capsys) -> None:
    """What a killed build leaves: absent, empty or no manifest; only a build's own files;
    every file under a final shard name complete; pack-verify and train-run refuse it."""
    if out.exists():
        names = os.listdir(out)
        assert MANIFEST not in names
        assert all(O.is_ours(n) for n in names), names
        for n in names:
            if n.startswith("shard-"):  # renamed only when complete, so it must read whole
                with pa.memory_map(str(out / n)) as src:
                    if src.read(6) == b"ARROW1":
                        src.seek(0)
                        pa.ipc.open_file(src).read_all()
                    else:
                        src.seek(0)
                        pa.ipc.open_stream(src).read_all()
            else:  # anything else is visibly temporary, or the marker of a build under way
                assert ".tmp" in n or n in (O.CARD, O.BUILDING), n
    capsys.readouterr()
    assert verify_main([str(out), "--quiet"]) == 1
    cap = capsys.readouterr()
    fails = [line for line in cap.out.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and ("manifest-missing" in fails[0]), cap.out
    assert "Traceback" not in cap.out + cap.err

    from train.cli import run_main

    assert run_main(["--shards", str(out), "--output", str(out.parent / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(out) in err, err
    assert "rerun pack-build" in err or "no such dataset directory" in err, err


def rerun_same_command(argv: list[str], out: Path, want: dict[str, str], capsys) -> None:
    had_leftovers = out.is_dir() and any(out.iterdir())
    capsys.readouterr()
    assert build_main(argv) == 0
    err = capsys.readouterr().err
    assert ("interrupted pack-build" in err) == had_leftovers, err
    assert digest(out) == want
    assert verify_main([str(out), "--quiet"]) == 0


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def corpus(chat_jsonl) -> Path:
    """200 real chitchat conversations: a build of a second or two after start-up."""
    return chat_jsonl


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, tokenizer_dir) -> dict[int, dict]:
    """Per --workers: the uninterrupted build's digest, timeline and output path."""
    base = tmp_path_factory.mktemp("ref")
    ref = {}
    for workers in (1, 2):
        out = base / f"w{workers}"
        argv = argv_for(corpus, out, tokenizer_dir, workers)
        assert build_main(argv) == 0  # loads (and caches) the tokenizer in this process
        want = digest(out)
        shutil.rmtree(out)
        tl = timeline(argv, out)
        assert digest(out) == want  # a forked build is the same build
        shutil.rmtree(out)
        # the kill tests build into this same path: arguments.out is in the manifest
        ref[workers] = {"digest": want, "timeline": tl, "out": out}
    # the number of workers never changes the shards
    shards = {k: v for k, v in ref[1]["digest"].items() if k.startswith("shard-")}
    assert shards == {k: v for k, v in ref[2]["digest"].items() if k.startswith("shard-")}
    assert len(shards) > 10
    return ref


def kill_plan(tl: dict[str, float]) -> list[tuple[str, float]]:
    """12 kill points: one before the output directory exists, five spread over reading and
    tokenizing, five over writing shards, one as soon as the card appears (just before the
    manifest: a narrow window that a kill does not always hit)."""
    read = max(tl["shard"] - tl["dir"], 0.05)
    write = max(tl["end"] - tl["shard"], 0.05)
    return ([("start", 0.5 * tl["dir"])]
            + [("dir", f * read) for f in (0.0, 0.2, 0.4, 0.6, 0.8)]
            + [("shard", f * write) for f in (0.0, 0.2, 0.4, 0.6, 0.85)]
            + [("card", 0.0)])


# ---------------------------------------------------------------- the kill test

@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 1])
def test_sigkill_at_many_points_then_rerun_gives_same_bytes(workers, reference, corpus,
                                                            tokenizer_dir, capsys):
    want = reference[workers]["digest"]
    plan = kill_plan(reference[workers]["timeline"])
    out = reference[workers]["out"]
    argv = argv_for(corpus, out, tokenizer_dir, workers)
    killed = 0
    for trigger, delay in plan:
        for _ in range(4):  # a loaded machine may finish first: retry the point earlier
            running, pgid = kill_at(argv, out, trigger, delay)
            assert wait_no_orphans(pgid) == [], "pool workers outlived their killed parent"
            if running:
                break
            assert digest(out) == want  # the build won the race: it is complete and right
            shutil.rmtree(out)
            delay *= 0.5
        phase = phase_of(out) if running else "finished-before-kill"
        RESULTS[str(workers)].append((trigger, round(delay, 3), phase))
        if not running and trigger == "card":  # the window is milliseconds wide
            continue
        assert running, f"{trigger} + {delay}s: the build always finished before the kill"
        killed += 1
        assert phase != "finished"
        assert_not_a_dataset(out, capsys)
        rerun_same_command(argv, out, want, capsys)
        shutil.rmtree(out, ignore_errors=True)
    with capsys.disabled():
        counts = collections.Counter(p for _, _, p in RESULTS[str(workers)])
        print(f"\n[faults] --workers {workers}: {killed} SIGKILLs; phases hit: "
              f"{dict(counts)}; points: {RESULTS[str(workers)]}")
    assert killed >= len(plan) - 1 >= 11
    # the plan reaches both halves of the build: the sample store and the shard writing
    phases = {p for _, _, p in RESULTS[str(workers)]}
    assert "tokenize" in phases and ({"write", "card"} & phases), phases


@pytest.mark.slow
def test_sigkill_real_cli_process(reference, corpus, tokenizer_dir):
    """The same through the command line (a fresh interpreter each time: slow, so one
    point), killed while writing shards, and rerun as the same command line."""
    out = reference[2]["out"]
    cmd = [sys.executable, "-m", "pack.cli", "build", *argv_for(corpus, out, tokenizer_dir, 2)]
    want = reference[2]["digest"]
    tl = reference[2]["timeline"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    for trigger, delay in (("shard", 0.3 * (tl["end"] - tl["shard"])),):
        p = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            if out.is_dir() and (trigger == "dir" or any(
                    n.startswith((".shard-", "shard-")) for n in os.listdir(out))):
                break
            time.sleep(0.002)
        time.sleep(delay)
        running = p.poll() is None
        p.kill()
        p.communicate()
        assert wait_no_orphans(p.pid) == []
        if not running:  # finished first (a loaded machine): nothing to check here
            shutil.rmtree(out)
            continue
        assert MANIFEST not in os.listdir(out)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert "interrupted pack-build" in r.stderr
        assert digest(out) == want
        shutil.rmtree(out)


# ---------------------------------------------------------------- what is never deleted

def _leftovers(out: Path) -> None:
    """What a killed build leaves: its marker (written before anything else) and partial files."""
    out.mkdir()
    (out / O.BUILDING).write_text("12345\n")
    (out / "shard-00000.arrow").write_bytes(b"partial")
    (out / ".shard-00001.arrow.tmp").write_bytes(b"partial")
    (out / O.TMP_SAMPLES).write_bytes(b"partial")


def _build(out: Path, corpus: Path, tok: Path, *extra: str) -> int:
    return build_main([str(corpus), str(out), "--tokenizer", str(tok), "--max-length", "256",
                       "--workers", "1", "--quiet", *extra])


def test_leftovers_are_cleaned_without_overwrite(tmp_path, chat_jsonl, tokenizer_dir, capsys):
    out = tmp_path / "out"
    _leftovers(out)
    (out / f".{O.CARD}.tmp-123").write_bytes(b"half a card")
    assert _build(out, chat_jsonl, tokenizer_dir) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "interrupted pack-build" in line]
    assert len(notes) == 1 and str(out) in notes[0]
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    assert verify_main([str(out), "--quiet"]) == 0


def test_foreign_file_is_never_deleted(tmp_path, chat_jsonl, tokenizer_dir, capsys):
    out = tmp_path / "out"
    _leftovers(out)
    (out / "notes.txt").write_text("mine")
    assert _build(out, chat_jsonl, tokenizer_dir) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not empty" in err and "\n" not in err
    assert sorted(os.listdir(out)) == sorted([".shard-00001.arrow.tmp", O.TMP_SAMPLES,
                                              "notes.txt", "shard-00000.arrow", O.BUILDING])


def test_lone_readme_is_not_taken_for_leftovers(tmp_path, chat_jsonl, tokenizer_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my project")
    assert _build(out, chat_jsonl, tokenizer_dir) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "README.md").read_text() == "my project"


def test_user_files_named_like_a_builds_are_never_deleted(tmp_path, chat_jsonl, tokenizer_dir,
                                                         capsys):
    """A user's README.md beside a stray shard-00007.arrow used to be taken for a killed
    build's leftovers and deleted without --overwrite. Only what a build provably wrote goes:
    the leftovers beside its marker, or with --overwrite the files its manifest lists."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my project")
    (out / "shard-00007.arrow").write_bytes(b"mine")
    assert _build(out, chat_jsonl, tokenizer_dir) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "README.md").read_text() == "my project"
    assert (out / "shard-00007.arrow").read_bytes() == b"mine"

    ds = tmp_path / "ds"
    assert _build(ds, chat_jsonl, tokenizer_dir) == 0
    (ds / "shard-00007.arrow").write_bytes(b"mine")  # not in the manifest: not the build's
    assert _build(ds, chat_jsonl, tokenizer_dir, "--overwrite") == 0
    assert (ds / "shard-00007.arrow").read_bytes() == b"mine"
    assert not (ds / O.BUILDING).exists()
    assert verify_main([str(ds), "--quiet"]) == 0


def test_finished_dataset_still_needs_overwrite(tmp_path, chat_jsonl, tokenizer_dir, capsys):
    out = tmp_path / "out"
    assert _build(out, chat_jsonl, tokenizer_dir) == 0
    before = digest(out)
    assert _build(out, chat_jsonl, tokenizer_dir) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert digest(out) == before
    assert _build(out, chat_jsonl, tokenizer_dir, "--overwrite") == 0


def test_live_build_is_not_taken_for_leftovers(tmp_path, chat_jsonl, tokenizer_dir, capsys):
    """A directory another pack-build is writing (it holds the lock) looks like leftovers;
    a second build must refuse it, not delete the first one's files."""
    out = tmp_path / "out"
    _leftovers(out)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert _build(out, chat_jsonl, tokenizer_dir) == 2
        err = capsys.readouterr().err.strip()
        assert "another pack-build is writing" in err and str(out) in err and "\n" not in err
        assert len(os.listdir(out)) == 4
    finally:
        os.close(fd)
    assert _build(out, chat_jsonl, tokenizer_dir) == 0  # lock gone: leftovers cleaned


def test_lock_is_released_after_each_build(tmp_path, chat_jsonl, tokenizer_dir):
    out = tmp_path / "out"
    assert _build(out, chat_jsonl, tokenizer_dir) == 0
    assert O._OUT_LOCKS == {}
    assert _build(out / "missing-input-dir", tmp_path / "nope.jsonl", tokenizer_dir) == 2
    assert O._OUT_LOCKS == {}
    assert _build(out, chat_jsonl, tokenizer_dir, "--overwrite") == 0
