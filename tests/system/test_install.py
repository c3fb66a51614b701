"""A normal (non-editable) install works: build the wheel, install it into a fresh target and run
pack-build, pack-verify and a one-step train-run from a directory outside the repository, with
the installed code (not this checkout) on the path. Catches files the wheel lacks, such as the
JSON schemas the manifest is validated against."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("install")
    # a copy of what git tracks: setuptools would leave build/ in the checkout, and a stale
    # build/lib could slip deleted modules into a later wheel
    src = work / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                             capture_output=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    wheels = work / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(src)],
                   check=True, cwd=work, capture_output=True)
    (wheel,) = wheels.glob("packtrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pack/schemas/manifest.schema.json" in names
    assert "pack/schemas/shard.schema.json" in names
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                    "--target", str(target), str(wheel)], check=True, capture_output=True)
    return target


def run(installed: Path, cwd: Path, *argv: str, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["PYTHONPATH"] = str(installed)  # before site-packages: the wheel's code, not ours
    env["OMP_NUM_THREADS"] = "1"
    script = installed / "bin" / argv[0]  # the wheel's own console script
    p = subprocess.run([str(script), *argv[1:]], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"{argv[0]} exited {p.returncode}: {p.stderr[-3000:]}"
    return p.stdout + p.stderr


def test_installed_code_is_the_wheel(installed, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(installed))
    out = subprocess.run([sys.executable, "-c", "import pack.format, train.loop; "
                          "print(pack.format.__file__); print(train.loop.__file__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    for line in out.stdout.split():
        assert line.startswith(str(installed)), line


@pytest.mark.slow
def test_pack_verify_and_train_from_the_wheel(installed, tmp_path, tokenizer_dir, chat_jsonl):
    from train.tiny import make_tiny_model

    model = make_tiny_model("llama", tokenizer_dir, tmp_path / "model", hidden=32, layers=2,
                            heads=4, kv_heads=2, seed=0)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run(installed, outside, "pack-build", "--tokenizer", str(tokenizer_dir), "--max-length", "512",
        "--quiet", str(chat_jsonl), "ds")
    manifest = json.loads((outside / "ds" / "manifest.json").read_text())
    assert manifest["stats"]["packs"] > 0
    run(installed, outside, "pack-verify", "ds")
    out = run(installed, outside, "train-run", "--shards", "ds", "--model", str(model),
              "--output", "run", "--max-steps", "1", "--zero", "0", "--dtype", "fp32",
              "--no-export")
    assert "done: 1 steps" in out
    assert len((outside / "run" / "metrics.jsonl").read_text().splitlines()) == 1
