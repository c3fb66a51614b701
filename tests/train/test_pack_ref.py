"""pack-ref: stored reference log-probs equal segment_logps computed live on the same packs; an
interrupted run resumes to byte-identical sidecars; 2 ranks (ZeRO-3, partitioned) write what 1
rank writes; pack-verify checks the sidecar; user errors are one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import DIST_VARS
from pack.offline import chitchat_conversations

ROOT = Path(__file__).resolve().parents[2]


def pairs_jsonl(path: Path, n: int = 36) -> Path:
    """Preference pairs from real chitchat turns (TRL conversational format): chosen = the real
    reply, rejected = the reply of the next conversation."""
    cands = []
    for rec in chitchat_conversations():
        m = rec["messages"]
        if len(m[0]["content"]) + len(m[1]["content"]) < 250:
            cands.append((m[:1], m[1]["content"]))
        if len(cands) > n:
            break
    with open(path, "w") as f:
        for k in range(n):
            f.write(json.dumps({"prompt": cands[k][0],
                                "chosen": [{"role": "assistant", "content": cands[k][1]}],
                                "rejected": [{"role": "assistant", "content": cands[k + 1][1]}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def pref(tokenizer_dir, work) -> Path:
    """36 pairs packed at 256 tokens into shards of 4 packs (several shards)."""
    from pack.cli import build_main

    out = work / "pref"
    assert build_main([str(pairs_jsonl(work / "pairs.jsonl")), str(out), "--tokenizer",
                       str(tokenizer_dir), "--max-length", "256", "--shard-size", "4", "--quiet",
                       "--workers", "1"]) == 0
    return out


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items()
         if k not in DIST_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return e


def pack_ref(*args: str, timeout: int = 600, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.pack_ref", *map(str, args)],
                          capture_output=True, text=True, env=env(**extra), timeout=timeout)


def sidecar_files(ds: Path) -> dict[str, bytes]:
    return {str(p.relative_to(ds)): p.read_bytes() for p in sorted((ds / "reference").rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def stored(pref, model_dir, work) -> Path:
    """A copy of `pref` with the reference log-probs of `model_dir` (one rank, fp32), written by
    the real command in its own process (what users run; shared by the tests below)."""
    ds = work / "stored"
    shutil.copytree(pref, ds)
    r = pack_ref(model_dir, ds)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pack-ref:" in r.stdout and "0 reused" in r.stdout
    return ds


def test_stored_values_equal_live_segment_logps(stored, model_dir):
    from pack.format import PackedDataset, read_manifest
    from pack.reference import ReferenceReader, find_reference, model_fingerprint
    from train.attention import enable_packed_attention
    from train.data import collate
    from train.preference import segment_logps
    from transformers import AutoModelForCausalLM

    manifest = read_manifest(stored)
    entry = find_reference(manifest, model_fingerprint(model_dir))
    assert entry is not None and entry["dtype"] == "fp32" and entry["model"] == str(model_dir)
    ds, ref = PackedDataset(stored), ReferenceReader(stored, entry)
    assert len(ref) == len(ds) and len(manifest["shards"]) >= 3
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.config.use_cache = False
    enable_packed_attention(model, "sdpa")
    model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as pack-ref ran (OMP_NUM_THREADS=1): the same reduction order
    try:
        live = []
        for i in range(len(ds)):
            mb = collate([ds[i]])
            with torch.no_grad():
                live.append(segment_logps(model, mb.input_ids, mb.labels, mb.position_ids,
                                          mb.cu_seqlens, bounds=mb.bounds, max_seqlen=mb.max_seqlen,
                                          label_count=mb.label_tokens))
    finally:
        torch.set_num_threads(threads)
    for i in range(len(ds)):
        mb = collate([ds[i]])
        got = ref[i]
        assert got.dtype == np.float64 and len(got) == len(mb.bounds) - 1
        np.testing.assert_array_equal(got, live[i].double().numpy())  # exact in fp32
        assert (got < 0).all()


def test_rerun_reuses_every_shard(stored, model_dir):
    before = sidecar_files(stored)
    r = pack_ref(model_dir, stored)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "0 shard(s) computed" in r.stdout
    assert sidecar_files(stored) == before


def test_interrupted_run_resumes_byte_identical(pref, stored, model_dir, tmp_path):
    # two pack-ref processes (~20 s each on 2 busy cores, mostly imports): a real SIGKILL mid-run
    ds = tmp_path / "ds"
    shutil.copytree(pref, ds)
    r = pack_ref(model_dir, ds, PACKTRAIN_FAULTPOINT="kill-after-shard:2")
    assert r.returncode == -9, r.stderr[-2000:]
    from pack.format import read_manifest

    assert not read_manifest(ds).get("reference_logps")  # not committed: not usable yet
    assert len([p for p in (ds / "reference").rglob("shard-*.arrow")]) == 2
    r = pack_ref(model_dir, ds)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 reused" in r.stdout
    assert sidecar_files(ds) == sidecar_files(stored)
    assert read_manifest(ds)["reference_logps"] == read_manifest(stored)["reference_logps"]


@pytest.mark.slow  # two ranks under torchrun, DeepSpeed ZeRO-3 start-up (~40 s on 2 cores)
def test_two_ranks_zero3_write_what_one_rank_writes(pref, stored, model_dir, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(pref, ds)
    cfg = tmp_path / "ds.json"  # partition even the tiny model's parameters (FACTS.md)
    cfg.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    r = pack_ref(model_dir, ds, "--nproc", "2", "--zero", "3", "--deepspeed", cfg)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert sidecar_files(ds) == sidecar_files(stored)


def test_pack_verify_checks_the_sidecar(stored, tmp_path):
    from pack.cli import verify_main

    assert verify_main([str(stored)]) == 0
    ds = tmp_path / "ds"
    shutil.copytree(stored, ds)
    victim = sorted((ds / "reference").rglob("shard-*.arrow"))[1]
    data = bytearray(victim.read_bytes())
    data[-200] ^= 0x01  # one flipped bit in the values
    victim.write_bytes(bytes(data))
    r = subprocess.run([sys.executable, "-c", "import sys; from pack.cli import verify_main as m; "
                        f"sys.exit(m([{str(ds)!r}]))"], capture_output=True, text=True, env=env())
    assert r.returncode != 0
    assert victim.name in r.stdout + r.stderr and "Traceback" not in r.stderr


def one_line_refusal(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


def test_refuses_sft_dataset(dataset, model_dir):
    one_line_refusal(pack_ref(model_dir, dataset), str(dataset), "not a preference dataset")


def test_refuses_missing_dataset(model_dir, tmp_path):
    one_line_refusal(pack_ref(model_dir, tmp_path / "nope"), "nope")


def test_refuses_model_without_weights(pref, tokenizer_dir, tmp_path):
    from train.tiny import copy_tokenizer_files

    bare = tmp_path / "bare"
    bare.mkdir()
    copy_tokenizer_files(tokenizer_dir, bare)
    ds = tmp_path / "ds"
    shutil.copytree(pref, ds)
    one_line_refusal(pack_ref(bare, ds), str(bare))
    assert not (ds / "reference").exists()


def test_refuses_other_tokenizer(pref, tmp_path):
    from pack.offline import llama3_tokenizer_dir
    from train.tiny import make_tiny_model

    other = llama3_tokenizer_dir(tmp_path / "tok", template=None)  # no chat template: another fingerprint
    model = make_tiny_model("llama", other, tmp_path / "m", hidden=32, layers=1, heads=2, kv_heads=1)
    ds = tmp_path / "ds"
    shutil.copytree(pref, ds)
    one_line_refusal(pack_ref(model, ds), "tokenizer mismatch")


@pytest.mark.slow  # two train-run processes (~25 s each on 2 busy cores)
def test_train_run_stored_reference_gives_live_losses(stored, model_dir, tmp_path):
    """train-run --objective dpo with pack-ref's values (--ref-logps stored; auto picks them too,
    the fingerprint matching) trains exactly as with a reference forward in every step."""
    runs = {}
    for mode in ("live", "stored", "auto"):
        out = tmp_path / mode
        r = subprocess.run([sys.executable, "-m", "train.cli", "--shards", str(stored), "--model",
                            str(model_dir), "--output", str(out), "--objective", "dpo",
                            "--ref-logps", mode, "--dtype", "fp32", "--lr", "1e-3", "--schedule",
                            "constant", "--max-steps", "4", "--no-export", "--log-every", "100"],
                           capture_output=True, text=True, env=env(), timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[mode] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        if mode == "auto":
            break
    live, stored_, auto = runs["live"], runs["stored"], runs["auto"]
    assert len(live) == len(stored_) == 4
    assert abs(live[0]["loss"] - np.log(2)) < 1e-6  # policy == reference at the first step
    for a, b, c in zip(live, stored_, auto):
        for k in ("loss", "logps/chosen", "logps/rejected", "rewards/margin"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (k, a, b)
        assert c["loss"] == b["loss"]  # auto: the stored values
    assert live[-1]["loss"] != live[0]["loss"]  # it trained: later losses depend on the reference


def test_other_dtype_recomputes_every_shard(stored, model_dir, tmp_path):
    """Sidecar shards of an fp32 run are not reused by a bf16 run (one precision per sidecar)."""
    from pack.format import read_manifest

    ds = tmp_path / "ds"
    shutil.copytree(stored, ds)
    r = pack_ref(model_dir, ds, "--dtype", "bf16")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "0 reused" in r.stdout
    (entry,) = read_manifest(ds)["reference_logps"]
    assert entry["dtype"] == "bf16"
    assert sidecar_files(ds) != sidecar_files(stored)
