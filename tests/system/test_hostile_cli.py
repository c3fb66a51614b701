"""Hostile command lines: every numeric and path flag of every command, given NaN, infinities,
negative, zero, huge, empty and non-numbers, or a file where a folder is expected (and the
reverse). Each case must end in exit 0 with a valid result or in a one-line error (argparse's
own usage error counts: its last line names the flag), never a traceback, a hang or a silently
wrong result. The number of cases per command is printed at the end (docs/testing.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from pack.cli import build_main, info_main, merge_main, verify_main

CASES: Counter = Counter()
NUMBERS = ["nan", "inf", "-inf", "-1", "0", "1", "1e999", "99999999999999999999", "", "x",
           "1.5", "-0"]


@pytest.fixture(scope="module", autouse=True)
def report_cases():
    yield
    print(f"\n[hostile cli] cases run: {dict(CASES)}; total {sum(CASES.values())}")


@pytest.fixture(scope="module")
def small(tmp_path_factory, chat_jsonl) -> Path:
    path = tmp_path_factory.mktemp("cli") / "small.jsonl"
    path.write_text("".join(open(chat_jsonl).readlines()[:12]))
    return path


@pytest.fixture(scope="module")
def dataset(small, tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli-ds") / "ds"
    assert build_main([str(small), str(out), "--tokenizer", str(tokenizer_dir), "--quiet",
                       "--workers", "1", "--max-length", "512"]) == 0
    return out


def call(main, argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's usage errors
            rc = e.code if isinstance(e.code, int) else 1
    return rc, out.getvalue() + err.getvalue()


def clean_end(rc: int, text: str, case: str, ok: tuple[int, ...] = (0, 2)) -> None:
    assert "Traceback" not in text, (case, text)
    assert rc in ok, (case, rc, text)
    if rc == 2:
        errors = [line for line in text.splitlines() if "error: " in line]
        assert len(errors) == 1 and errors[0] == text.strip().splitlines()[-1], (case, text)


# ---------------------------------------------------------------- pack-build

BUILD_NUMBERS = ["--max-length", "--seed", "--workers", "--shard-size", "--num-partitions",
                 "--partition", "--eval-fraction", "--eval-records", "--eval-seed"]


def test_pack_build_numbers(small, tokenizer_dir, tmp_path):
    from pack.format import verify

    for flag in BUILD_NUMBERS:
        for value in NUMBERS:
            out = tmp_path / f"o{CASES['pack-build']}"
            extra = ["--num-partitions", "2"] if flag == "--partition" else []
            rc, text = call(build_main, [str(small), str(out), "--tokenizer", str(tokenizer_dir),
                                         "--quiet", "--workers", "1", *extra, flag, value])
            case = f"{flag} {value!r}"
            clean_end(rc, text, case)
            if rc == 0:  # accepted: a real, valid dataset with the value it was given
                assert verify(out) == [], case
                m = json.loads((out / "manifest.json").read_text())
                if flag == "--max-length":
                    assert m["max_length"] == int(value), case
            else:
                assert not (out / "manifest.json").exists(), case
            CASES["pack-build"] += 1


def test_pack_build_paths(small, tokenizer_dir, tmp_path):
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not what you expect\n")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    binary = tmp_path / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    missing = tmp_path / "missing"
    odd = [str(a_file), str(a_dir), str(binary), str(missing), "", str(a_file / "below")]
    for flag in ("--tokenizer", "--chat-template", "INPUT", "OUT"):
        for value in odd:
            argv = {"INPUT": [value, str(tmp_path / f"o{CASES['pack-build paths']}")],
                    "OUT": [str(small), value]}.get(
                flag, [str(small), str(tmp_path / f"o{CASES['pack-build paths']}"), flag, value])
            if flag != "--tokenizer":
                argv += ["--tokenizer", str(tokenizer_dir)]
            rc, text = call(build_main, [*argv, "--quiet", "--workers", "1"])
            clean_end(rc, text, f"{flag} {value!r}")
            if flag == "OUT" and value == str(a_file):
                assert rc == 2 and a_file.read_text() == "not what you expect\n"
            CASES["pack-build paths"] += 1


# ---------------------------------------------------------------- pack-info, pack-verify, pack-merge

def test_reader_commands_paths(dataset, tmp_path):
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    odd = [str(a_file), str(empty), str(tmp_path / "missing"), "", str(dataset / "manifest.json"),
           str(a_file / "below")]
    for value in odd:
        for name, main, ok in (("pack-info", info_main, (0, 2)),
                               ("pack-verify", verify_main, (0, 1, 2))):
            rc, text = call(main, [value])
            clean_end(rc, text, f"{name} {value!r}", ok)
            assert rc != 0, (name, value)
            CASES[name] += 1
        for plot in (str(empty), str(dataset / "manifest.json"), str(tmp_path / "noext"),
                     str(a_file / "x.png")):
            rc, text = call(info_main, ["--plot", plot, str(dataset)])
            clean_end(rc, text, f"--plot {plot!r}")
            assert rc == 2, plot
            CASES["pack-info"] += 1
        rc, text = call(merge_main, [value, str(dataset), str(tmp_path / f"m{CASES['pack-merge']}")])
        clean_end(rc, text, f"pack-merge {value!r}")
        assert rc == 2
        rc, text = call(merge_main, [str(dataset), str(dataset), value])
        clean_end(rc, text, f"pack-merge OUT {value!r}")
        assert rc == 2
        CASES["pack-merge"] += 2


# ---------------------------------------------------------------- train-run

TRAIN_NUMBERS = {  # flag -> values of NUMBERS that are valid for it (the rest must be refused)
    "--epochs": {"1"}, "--max-steps": {"0", "1", "-0"}, "--lr": {"0", "1", "1.5", "-0"},
    "--min-lr": {"0", "-0"}, "--warmup-steps": {"0", "1", "-0"},
    "--weight-decay": {"0", "1", "1.5", "-0"}, "--grad-clip": {"0", "1", "1.5", "-0"},
    "--micro-batch": {"1"}, "--grad-accum": {"1"}, "--seed": {"0", "1", "-0"},
    "--nproc": {"1"}, "--loss-chunk": {"1"}, "--dist-timeout": {"1", "1.5"},
    "--lora-r": {"1"}, "--lora-alpha": {"1", "1.5"}, "--lora-dropout": {"0", "-0"},
    "--save-every": {"0", "1", "-0"}, "--log-every": {"1"}, "--skip-nonfinite": {"0", "1", "-0"},
    "--eval-every": {"0", "-0"}, "--eval-max-packs": set(),  # > 0: refused, no eval set here
}


def test_train_run_numbers_are_checked_before_any_work(dataset, tmp_path, monkeypatch):
    """Every numeric flag: an invalid value is refused in one line before anything is loaded;
    a valid one passes the check (the run is not started here: train() is replaced)."""
    import train.loop
    from train.cli import run_main

    started = []
    monkeypatch.setattr(train.loop, "train", lambda args: started.append(args))
    for flag, valid in TRAIN_NUMBERS.items():
        for value in NUMBERS:
            started.clear()
            rc, text = call(run_main, ["--shards", str(dataset), "--model", "unused",
                                       "--output", str(tmp_path / "run"), flag, value])
            case = f"{flag} {value!r}"
            clean_end(rc, text, case)
            if value in valid:
                assert rc == 0 and len(started) == 1, (case, text)
            else:
                assert rc == 2 and not started, (case, text)
            CASES["train-run"] += 1


def test_train_run_paths(inproc_env, dataset, model_dir, tmp_path):
    from train.cli import run_main

    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    base = {"--shards": str(dataset), "--model": str(model_dir),
            "--output": str(tmp_path / "run")}
    for flag in ("--shards", "--model", "--output", "--resume", "--deepspeed", "--cache-dir",
                 "--eval-shards"):
        for value in (str(a_file), str(a_dir), str(tmp_path / "missing"), "",
                      str(a_file / "below")):
            args = dict(base)
            args[flag] = value
            if flag != "--output":
                args["--output"] = str(tmp_path / f"run{CASES['train-run paths']}")
            argv = [x for kv in args.items() for x in kv]
            rc, text = call(run_main, [*argv, "--dtype", "fp32", "--zero", "0", "--no-export",
                                       "--max-steps", "1"])
            clean_end(rc, text, f"{flag} {value!r}", (0, 2))
            if flag in ("--shards", "--model", "--eval-shards") or value == "" or \
                    (flag == "--output" and value == str(a_file)):
                assert rc == 2, (flag, value, text)
            CASES["train-run paths"] += 1


@pytest.fixture
def inproc_env():
    """A one-rank process group in this process, as the training tests use."""
    from train.dist import distributed_env

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.pop(k, None)
    os.environ.update(distributed_env())
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
