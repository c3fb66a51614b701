"""train.loop / train-run: exact loss, multi-rank equivalence, resume, errors.

Fast tests run in this process (world size 1, gloo). Multi-rank tests (`slow`) spawn 2 ranks:
one torchrun job runs ZeRO 0, 1, 2, 3 and the first half of a resume in turn (one start-up for
all), then `train-run --nproc 2 --resume auto` finishes the resume through the real CLI and
launcher. All runs use the real Llama 3 tokenizer, real chat data packed by pack-build and a tiny
random Llama, in fp32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import DIST_VARS

STEPS = 8
# Constant LR after a 2-step warm-up: the schedule does not depend on the total step count, so
# a run stopped with --max-steps 3 and resumed to 6 must match an uninterrupted run exactly.
COMMON = ["--dtype", "fp32", "--lr", "3e-3", "--schedule", "constant", "--warmup-steps", "2",
          "--grad-clip", "1.0", "--seed", "0", "--log-every", "4"]


# ---------------------------------------------------------------- fixtures
# (work, dataset, model_dir: tests/conftest.py)



# The venv's console script, not whatever `train-run` PATH finds (make test does not activate).
TRAIN_RUN = str(Path(sys.executable).parent / "train-run")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in DIST_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def train_args(dataset, model_dir, out, *extra):
    from train.cli import parse_run_args

    return parse_run_args(["--shards", str(dataset), "--model", str(model_dir),
                           "--output", str(out), *COMMON, *extra])


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- exact loss (in-process)

def _unpacked_reference(model_dir, micro_batches):
    """HF's own loss on the individual samples, padded into one batch with an attention mask,
    reduction = sum / (label tokens of the whole step) via num_items_in_batch."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                               attn_implementation="sdpa")
    ref.train()
    samples = []
    for mb in micro_batches:
        cu = mb.cu_seqlens.tolist()
        for s, e in zip(cu[:-1], cu[1:]):
            samples.append((mb.input_ids[0, s:e], mb.labels[0, s:e]))
    width = max(len(i) for i, _ in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for r, (i, l) in enumerate(samples):
        ids[r, :len(i)], labels[r, :len(l)], mask[r, :len(i)] = i, l, 1
    n = int((labels[:, 1:] != -100).sum())
    out = ref(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n,
              use_cache=False)
    out.loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in ref.named_parameters()}
    return float(out.loss.detach()), grads, n, len(samples)


@pytest.mark.parametrize("extra", [[], ["--gradient-checkpointing"]], ids=["plain", "ckpt"])
def test_packed_step_equals_unpacked_training(inproc, dataset, model_dir, tmp_path, extra):
    """One optimizer step of 2 micro-steps x 2 packs per row through the DeepSpeed engine
    (ZeRO 0, fp32) has the loss and the gradients of unpacked training of the same samples,
    with and without gradient checkpointing."""
    from deepspeed.utils import safe_get_full_grad
    from train.loop import train_step
    from train.setup import build

    args = train_args(dataset, model_dir, tmp_path / "eq", "--zero", "0", "--grad-accum", "2",
                      "--micro-batch", "2", "--grad-clip", "0", *extra)
    run = build(args, inproc)
    micro_batches, _ = run.stream.next_step()
    assert len(micro_batches) == 2 and all(len(mb.pack_ids) == 2 for mb in micro_batches)
    captured = {}

    def grab(engine):
        for name, p in engine.module.named_parameters():
            captured[name] = safe_get_full_grad(p).detach().clone()

    res = train_step(run, micro_batches, before_update=grab)
    ref_loss, ref_grads, n, n_samples = _unpacked_reference(model_dir, micro_batches)
    assert n_samples > 4  # several samples per pack: packing is really exercised
    assert res.label_tokens == n
    assert abs(res.loss - ref_loss) < 1e-5, (res.loss, ref_loss)
    assert captured.keys() == ref_grads.keys()
    worst = max(float((captured[k] - ref_grads[k]).abs().max()) for k in ref_grads)
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    assert scale > 1e-3
    print(f"exact-loss check: loss {res.loss:.8f} vs {ref_loss:.8f}; max grad diff {worst:.3g} (max grad {scale:.3g}); {n_samples} samples, {n} label tokens")
    assert worst < 1e-6 + 1e-5 * scale, (worst, scale)
    # and DeepSpeed did apply exactly one optimizer step with the scheduler stepped once
    assert run.engine.global_steps == 1


def test_lr_schedule_shapes():
    from train.setup import lr_factor

    kw = dict(lr=1e-3, min_lr=1e-4, warmup=2, total=10)
    cos = [lr_factor(s, schedule="cosine", **kw) for s in range(10)]
    lin = [lr_factor(s, schedule="linear", **kw) for s in range(10)]
    const = [lr_factor(s, schedule="constant", **kw) for s in range(10)]
    assert cos[:2] == [0.5, 1.0] and lin[:2] == [0.5, 1.0] and const[:3] == [0.5, 1.0, 1.0]
    assert cos[2] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.1)
    assert lin[-1] == pytest.approx(0.1) and all(np.diff(cos[1:]) <= 1e-12)
    assert const[-1] == 1.0


def test_distributed_env_defaults_and_slurm(monkeypatch):
    from train.dist import distributed_env

    for k in (*DIST_VARS, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST",
              "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    env = distributed_env()
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["LOCAL_RANK"] == "0"
    assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08],cpu1")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: parse the list ourselves
    env = distributed_env()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == str(29500 + 234)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed_env() == {}  # a launcher's variables win


def test_deepspeed_config_from_args(tmp_path):
    from pack.errors import PacktrainError
    from train.cli import parse_run_args
    from train.config import build_ds_config

    cpu = torch.device("cpu")
    a = parse_run_args(["--shards", "x", "--zero", "3", "--grad-accum", "4", "--grad-clip", "0.5"])
    cfg = build_ds_config(a, "bf16", cpu)
    assert cfg["train_micro_batch_size_per_gpu"] == 1 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"] == {"enabled": True}
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 1e5
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0,
                                                      "reduce_bucket_size": "auto"},
                                "gradient_accumulation_steps": "auto"}))
    a.deepspeed = str(user)
    cfg = build_ds_config(a, "fp32", cpu)
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 5e7  # "auto" keeps ours
    assert "bf16" not in cfg and "fp16" not in cfg
    user.write_text(json.dumps({"gradient_accumulation_steps": 8}))
    with pytest.raises(PacktrainError, match="--grad-accum"):
        build_ds_config(a, "fp32", cpu)
    a.deepspeed = None
    a.offload, a.zero = "param", 2
    with pytest.raises(PacktrainError, match="--zero 3"):
        build_ds_config(a, "fp32", cpu)


# ---------------------------------------------------------------- resume, 1 rank (in-process)

def test_resume_one_rank_is_exact(inproc, dataset, model_dir, tmp_path):
    from train.loop import train

    base = ["--zero", "0", "--grad-accum", "2", "--no-export"]
    full = tmp_path / "full"
    train(train_args(dataset, model_dir, full, *base, "--max-steps", "6", "--save-every", "3"))
    part = tmp_path / "part"
    train(train_args(dataset, model_dir, part, *base, "--max-steps", "3"))
    state = json.loads((part / "checkpoints" / "step-00000003" / "packtrain_state.json").read_text())
    assert state["step"] == 3 and state["data"] == {"epoch": 0, "index": 6}
    train(train_args(dataset, model_dir, part, *base, "--max-steps", "6", "--resume", "auto"))
    a, b = losses(full), losses(part)
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6, (a, b)
    assert [m["lr"] for m in metrics(full)] == [m["lr"] for m in metrics(part)]
    assert (part / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    # both runs kept the layout E's export relies on
    for out in (full, part):
        assert (out / "run.json").is_file() and (out / "model_config" / "config.json").is_file()
        assert (out / "model_config" / "tokenizer.json").is_file()
        assert (out / "checkpoints" / "step-00000003" / "packtrain_state.json").is_file()
    # a fresh run into an output that has checkpoints is refused (no silent mixing)
    from pack.errors import PacktrainError

    with pytest.raises(PacktrainError, match="--resume auto"):
        train(train_args(dataset, model_dir, part, *base, "--max-steps", "6"))


# ---------------------------------------------------------------- clear errors

def test_missing_manifest_is_one_line_error(tmp_path):
    empty = tmp_path / "emptydir"
    empty.mkdir()
    for extra in ([], ["--nproc", "2"]):
        r = subprocess.run([sys.executable, "-m", "train.cli", "--shards", str(empty), *extra],
                           capture_output=True, text=True, env=clean_env(), timeout=300)
        assert r.returncode == 2, r.stderr
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "manifest.json" in lines[0]
        assert "Traceback" not in r.stderr


def test_bad_model_path_is_clean_error(inproc, dataset, tmp_path):
    from pack.errors import PacktrainError
    from train.loop import train

    with pytest.raises(PacktrainError, match="no such model directory"):
        train(train_args(dataset, tmp_path / "nope", tmp_path / "o", "--zero", "0"))


CLOSE_AT_EXIT = r"""
import atexit, os
import torch.distributed as tdist
from train.dist import close_distributed_at_exit, distributed_env, setup_distributed
os.environ.update(distributed_env())
setup_distributed()
# atexit runs last-registered first: this check runs after the group was destroyed
atexit.register(lambda: print("initialized at exit:", tdist.is_initialized(), flush=True))
close_distributed_at_exit()
close_distributed_at_exit()  # registered once
print("initialized now:", tdist.is_initialized(), flush=True)
"""


def test_process_group_is_destroyed_before_exit(tmp_path):
    r = subprocess.run([sys.executable, "-c", CLOSE_AT_EXIT], capture_output=True, text=True,
                       env=clean_env(), timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    said = [line for line in r.stdout.splitlines() if line.startswith("initialized")]
    assert said == ["initialized now: True", "initialized at exit: False"]


# ---------------------------------------------------------------- 2 ranks (slow)

DRIVER = r'''
import json, os, sys
from train.cli import run_main
for argv, env in json.load(open(sys.argv[1])):
    os.environ.update(env)
    rc = run_main(argv)
    if rc:
        sys.exit(rc)
'''


@pytest.fixture(scope="module")
def two_rank_runs(dataset, model_dir, work):
    """One torchrun job of 2 ranks runs ZeRO 0, 1, 2, 3 (8 steps: one epoch) and the first 3
    steps of a ZeRO-2 run to be resumed (ZeRO-3 last: it leaves transformers' ZeRO-3 state)."""
    z3 = work / "z3.json"
    z3.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    jobs, outs = [], {}
    for zero in (0, 1, 2, "resume", 3):
        out = work / f"r2-z{zero}"
        argv = ["--shards", str(dataset), "--model", str(model_dir), "--output", str(out),
                *COMMON, "--grad-accum", "2"]
        if zero == "resume":
            argv += ["--zero", "2", "--max-steps", "3", "--no-export"]
        else:
            argv += ["--zero", str(zero), "--max-steps", str(STEPS)]
            argv += ["--deepspeed", str(z3)] if zero == 3 else ["--no-export"]
        jobs.append([argv, {"PACKTRAIN_DEBUG_PACKS": str(out / "debug")}])
        outs[zero] = out
    (work / "jobs.json").write_text(json.dumps(jobs))
    (work / "driver.py").write_text(DRIVER)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", str(work / "driver.py"), str(work / "jobs.json")],
                       capture_output=True, text=True, env=clean_env(), timeout=900, cwd=work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return outs


@pytest.fixture(scope="module")
def one_rank_reference(inproc, dataset, model_dir, work):
    """The same global batches on 1 rank: --grad-accum 4 instead of 2 ranks x 2."""
    from train.loop import train

    out = work / "r1-ref"
    train(train_args(dataset, model_dir, out, "--zero", "0", "--grad-accum", "4",
                     "--max-steps", str(STEPS), "--no-export"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_two_ranks_match_one_rank(two_rank_runs, one_rank_reference, dataset, zero):
    from pack.format import PackedDataset

    out = two_rank_runs[zero]
    got, ref = metrics(out), metrics(one_rank_reference)
    assert len(got) == len(ref) == STEPS
    # same global batch -> same loss, label-token count and (through the updates) trajectory
    assert [m["label_tokens"] for m in got] == [m["label_tokens"] for m in ref]
    assert [m["tokens"] for m in got] == [m["tokens"] for m in ref]
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(got, ref)]
    assert max(diffs) < 1e-5, diffs  # measured: ~2e-7
    gn = [abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] for a, b in zip(got, ref)]
    assert max(gn) < 1e-4, gn  # measured: ~1e-7
    # the loss goes down
    ls = [m["loss"] for m in got]
    assert np.mean(ls[-3:]) < np.mean(ls[:3]) - 0.05, ls
    # ranks saw disjoint packs in every step; over the epoch every pack was trained
    per_rank = [[json.loads(line) for line in (out / "debug" / f"packs-rank{r}.jsonl")
                 .read_text().splitlines()] for r in (0, 1)]
    assert [len(p) for p in per_rank] == [STEPS, STEPS]
    seen = []
    for a, b in zip(*per_rank):
        ids_a = [i for mb in a["micro"] for i in mb]
        ids_b = [i for mb in b["micro"] for i in mb]
        assert len(ids_a) == len(ids_b) == 2
        if a["step"] < STEPS:  # the last step of the epoch may wrap around
            assert not set(ids_a) & set(ids_b)
        seen += ids_a + ids_b
    num_packs = len(PackedDataset(dataset))
    assert STEPS == -(-num_packs // 4), "the test dataset should be exactly one 8-step epoch"
    assert set(seen) == set(range(num_packs))
    assert len(seen) - num_packs == 4 * STEPS - num_packs  # only the documented wrap repeats


@pytest.mark.slow
def test_zero3_run_exported(two_rank_runs, tmp_path):
    """--export (default) wrote OUTPUT/export at the end of the 2-rank ZeRO-3 run (rank 0 alone,
    with the ZeRO-3 config released first); train-export reproduces it from the checkpoint."""
    from safetensors.torch import load_file
    from train.cli import export_main

    out = two_rank_runs[3]
    assert (out / "export" / "config.json").is_file()
    assert export_main([str(out), str(tmp_path / "again")]) == 0
    a = load_file(str(next((out / "export").glob("*.safetensors"))))
    b = load_file(str(next((tmp_path / "again").glob("*.safetensors"))))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_rank_failure_makes_launcher_fail(dataset, model_dir, tmp_path):
    r = subprocess.run([TRAIN_RUN, "--nproc", "2", "--shards", str(dataset), "--model",
                        str(model_dir), "--output", str(tmp_path / "o"), "--deepspeed",
                        str(tmp_path / "missing.json")],
                       capture_output=True, text=True, env=clean_env(), timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "error: " in r.stderr and "missing.json" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_resume_two_ranks_zero2_is_exact(two_rank_runs, dataset, model_dir):
    """Stopped after 3 steps, resumed with `train-run --nproc 2 --resume auto` to 6: the same
    per-step losses as the uninterrupted ZeRO-2 run."""
    out = two_rank_runs["resume"]
    assert len(losses(out)) == 3
    r = subprocess.run([TRAIN_RUN, "--nproc", "2", "--shards", str(dataset), "--model",
                        str(model_dir), "--output", str(out), *COMMON, "--grad-accum", "2",
                        "--zero", "2", "--max-steps", "6", "--resume", "auto", "--no-export"],
                       capture_output=True, text=True, env=clean_env(), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "resumed from" in r.stdout
    got, ref = losses(out), losses(two_rank_runs[2])[:6]
    assert len(got) == 6
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-6, (got, ref)
