"""train.evaluate / train-run --eval-*: the validation loss is exact, logged at step 0, every N
steps and at the end, survives --resume, matches on 2 ranks under ZeRO-3; --save-best names the
lowest; the eval set is found, checked and refused in one line.

In-process runs (world size 1, gloo) share one tiny Llama, the training data of
tests/conftest.py and one small eval set packed from other real records; the 2-rank ZeRO-3 run
(`slow`) is one `train-run --nproc 2`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from test_loop import COMMON, TRAIN_RUN, clean_env, metrics

EVAL = ["--micro-batch", "2", "--no-export", "--zero", "0"]  # 2 packs per row, per step


def eval_flags(path) -> list[str]:
    return ["--eval-shards", str(path), "--eval-every", "2", "--eval-max-packs", "7"]


@pytest.fixture(scope="module")
def eval_set(tokenizer_dir, work) -> Path:
    """Real chat exchanges packed at 128 tokens, more records than the training data: 12 packs
    or so, several samples each."""
    from helpers import make_packed_dataset

    return make_packed_dataset(tokenizer_dir, work / "evaldata", max_length=128, records=40)


def run_args(dataset, model_dir, out, *extra):
    from train.cli import parse_run_args

    return parse_run_args(["--shards", str(dataset), "--model", str(model_dir),
                           "--output", str(out), *COMMON, *extra])


def eval_lines(out: Path) -> dict[int, float]:
    return {m["step"]: m["eval_loss"] for m in metrics(out) if "eval_loss" in m}


# ---------------------------------------------------------------- exactness

def _one_at_a_time(model_dir, ds, packs) -> tuple[float, int]:
    """HF's own loss of every sample of `packs`, each run alone and unpadded: summed CE over all
    label tokens / their number."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                               attn_implementation="eager").eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(packs):
            p = ds[i]
            cu = p["cu_seqlens"].tolist()
            for s, e in zip(cu[:-1], cu[1:]):
                ids = torch.tensor(p["input_ids"][s:e], dtype=torch.long)[None]
                labels = torch.tensor(p["labels"][s:e], dtype=torch.long)[None]
                k = int((labels[:, 1:] != -100).sum())
                if not k:
                    continue
                out = ref(input_ids=ids, labels=labels, use_cache=False)
                total += float(out.loss) * k  # HF's loss is the mean over the sample's labels
                n += k
    return total / n, n


def test_lora_eval_has_no_dropout_and_restores_train_mode(inproc, dataset, model_dir, eval_set,
                                                          tmp_path):
    """LoRA with dropout 0.5, the module in train mode, adapters made non-zero: two evaluations
    agree exactly (dropout was off) and the module is in train mode again afterwards."""
    from train.evaluate import evaluate, open_eval_set
    from train.setup import build

    args = run_args(dataset, model_dir, tmp_path / "lora", *EVAL, "--lora", "--lora-r", "4",
                    "--lora-dropout", "0.5", "--eval-shards", str(eval_set),
                    "--eval-max-packs", "2")
    run = build(args, inproc)
    run.eval_set = open_eval_set(args, run.manifest, run.model, inproc)
    run.engine.train()
    with torch.no_grad():  # B = 0 at init: the adapters' dropout would not show
        for name, p in run.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    a, b = evaluate(run), evaluate(run)
    assert run.engine.module.training
    assert a == b and math.isfinite(a["eval_loss"])


def test_rank_rows_split_evenly_with_stand_ins():
    from train.evaluate import rank_rows

    assert rank_rows(5, 0, 2, 2) == ([[0, 2], [4]], 2)
    assert rank_rows(5, 1, 2, 2) == ([[1, 3]], 2)  # one forward on a stand-in
    assert rank_rows(1, 1, 2, 1) == ([], 1)
    assert rank_rows(6, 2, 3, 1) == ([[2], [5]], 2)


# ---------------------------------------------------------------- logging, --save-best, resume

@pytest.fixture(scope="module")
def full_run(inproc, dataset, model_dir, eval_set, work):
    """4 steps, evaluated every 2 on 7 packs, --save-best, checkpoints every 3; its plain
    progress lines (a line a step) are kept in WORK/full.stderr."""
    from train.loop import train

    out = work / "full"
    err = io.StringIO()  # not a terminal: "step N/M ..." lines
    with contextlib.redirect_stderr(err):
        summary = train(run_args(dataset, model_dir, out, *EVAL, *eval_flags(eval_set),
                                 "--max-steps", "4", "--save-every", "3", "--save-best",
                                 "--log-every", "1"))
    (work / "full.stderr").write_text(err.getvalue())
    return out, summary


def test_eval_loss_equals_samples_run_one_at_a_time(full_run, model_dir, eval_set):
    """Step 0 (the --model weights), 7 packs in rows of 2: the loss HF computes on each sample
    alone, to a relative 1e-4 (measured ~1e-7)."""
    from pack.format import PackedDataset

    step0 = metrics(full_run[0])[0]
    want, n = _one_at_a_time(model_dir, PackedDataset(eval_set), 7)
    assert step0["eval_tokens"] == n > 100
    rel = abs(step0["eval_loss"] - want) / want
    print(f"eval loss {step0['eval_loss']:.8f}, one at a time {want:.8f}: relative error {rel:.2g}")
    assert rel < 1e-4


def test_metrics_have_eval_at_start_every_n_and_end(full_run):
    out, summary = full_run
    lines = metrics(out)
    assert [m["step"] for m in lines] == [0, 1, 2, 3, 4]
    assert set(lines[0]) == {"step", "epoch", "eval_loss", "eval_tokens"}
    evals = eval_lines(out)
    assert sorted(evals) == [0, 2, 4]
    assert len({m["eval_tokens"] for m in lines if "eval_tokens" in m}) == 1
    assert evals[4] < evals[0]  # training lowers the held-out loss
    assert summary["eval_loss"] == evals[4]


def test_progress_lines_show_the_last_eval_loss_and_eta(full_run, work):
    """Every line after an evaluation shows its loss (with its step until the next one), and
    the time left."""
    evals = eval_lines(full_run[0])
    lines = {int(m.group(1)): m.group(0) for m in re.finditer(
        r"^step (\d+)/4 .*$", (work / "full.stderr").read_text(), re.M)}
    assert sorted(lines) == [0, 1, 2, 3, 4]
    for step, at in ((0, 0), (1, 0), (2, 2), (3, 2), (4, 4)):
        own = "" if step == at else f" (step {at})"
        assert f" eval_loss {evals[at]:.4f}{own} " in lines[step] + " ", lines[step]
    assert all(re.search(r" eta \d\d:\d\d$", lines[s]) for s in (1, 2, 3, 4)), lines


def test_save_best_names_lowest_complete_checkpoint(full_run):
    out, summary = full_run
    evals = {s: v for s, v in eval_lines(out).items() if s > 0}  # step 0 is --model itself
    best_step = min(evals, key=evals.get)
    ckpts = out / "checkpoints"
    tag = (ckpts / "best").read_text().strip()
    assert tag == f"step-{best_step:08d}"
    state = json.loads((ckpts / tag / "packtrain_state.json").read_text())
    assert state["step"] == best_step
    assert state["best_eval"]["step"] == best_step
    assert state["best_eval"]["eval_loss"] == evals[best_step]
    assert (ckpts / tag / "rng_state_0.json").is_file() and any((ckpts / tag).rglob("*.pt"))
    assert summary["best_eval"]["step"] == best_step


def test_resume_gives_the_same_eval_losses(inproc, full_run, dataset, model_dir, eval_set,
                                           tmp_path):
    """Stopped after 3 steps (its end: evaluated), resumed to 4: the eval losses of the
    uninterrupted run, no second step-0 line, and `best` still the lowest of this run's."""
    from train.loop import train

    out = tmp_path / "part"
    common = [*EVAL, *eval_flags(eval_set), "--save-best"]
    train(run_args(dataset, model_dir, out, *common, "--max-steps", "3"))
    train(run_args(dataset, model_dir, out, *common, "--max-steps", "4", "--resume", "auto"))
    full, part = eval_lines(full_run[0]), eval_lines(out)
    assert [m["step"] for m in metrics(out)] == [0, 1, 2, 3, 4]
    assert sorted(part) == [0, 2, 3, 4]  # 3: the first run's end
    for s in (0, 2, 4):
        assert abs(part[s] - full[s]) < 1e-6, (s, part[s], full[s])
    mine = {s: v for s, v in part.items() if s > 0}
    assert (out / "checkpoints" / "best").read_text().strip() == \
        f"step-{min(mine, key=mine.get):08d}"


# ---------------------------------------------------------------- finding and refusing eval sets

def test_default_eval_split_and_urls(dataset, eval_set, model_dir, tmp_path):
    """SHARDS/eval is the default eval set (directory or URL); --no-eval turns it off; a URL is
    fetched through the cache like --shards."""
    from train.cli import parse_run_args

    shards = tmp_path / "ds"
    shutil.copytree(dataset, shards)
    base = ["--shards", str(shards), "--model", str(model_dir)]
    assert parse_run_args(base).eval_shards is None
    shutil.copytree(eval_set, shards / "eval")
    assert parse_run_args(base).eval_shards == str(shards / "eval")
    assert parse_run_args([*base, "--no-eval"]).eval_shards is None
    url = parse_run_args(["--shards", shards.as_uri(), "--cache-dir", str(tmp_path / "c")])
    assert url.eval_shards_url == (shards / "eval").as_uri()
    assert Path(url.eval_shards, "manifest.json").read_bytes() == \
        (shards / "eval" / "manifest.json").read_bytes()


def test_eval_set_of_another_tokenizer_is_refused(inproc, dataset, eval_set, model_dir,
                                                  tmp_path):
    from pack.errors import PacktrainError
    from train.evaluate import open_eval_set
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other"
    shutil.copytree(eval_set, other)
    m = json.loads((other / "manifest.json").read_text())
    m["tokenizer"]["fingerprint"] = "sha256:" + "0" * 64
    (other / "manifest.json").write_text(json.dumps(m))
    args = run_args(dataset, model_dir, tmp_path / "o", "--eval-shards", str(other))
    from pack.format import read_manifest

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with pytest.raises(PacktrainError, match="another tokenizer") as e:
        open_eval_set(args, read_manifest(dataset), model, inproc)
    assert "\n" not in str(e.value) and str(other) in str(e.value)


@pytest.mark.parametrize("flags, says", [
    (["--eval-every", "-1"], "--eval-every -1"),
    (["--eval-max-packs", "0"], "--eval-max-packs 0"),
    (["--eval-every", "2"], "--eval-every: no eval set"),
    (["--save-best"], "--save-best: no eval set"),
    (["--eval-shards", "EVAL", "--save-best"], "--save-best needs --eval-every"),
    (["--eval-shards", "EVAL", "--no-eval"], "--no-eval"),
    (["--eval-shards", ""], "--eval-shards: empty"),
    (["--eval-shards", "MISSING"], "no such dataset"),
])
def test_bad_eval_flags_are_one_line_errors(dataset, eval_set, tmp_path, capsys, flags, says):
    from train.cli import run_main

    flags = [str(eval_set) if f == "EVAL" else str(tmp_path / "no") if f == "MISSING" else f
             for f in flags]
    assert run_main(["--shards", str(dataset), "--output", str(tmp_path / "o"), *flags]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- 2 ranks, ZeRO-3 (slow)

@pytest.mark.slow
def test_two_ranks_zero3_match_one_rank(full_run, dataset, model_dir, eval_set, work):
    """`train-run --nproc 2 --zero 3` (parameters really partitioned), one pack per rank and
    step: the global batches of the 1-rank run; 7 eval packs (one rank runs a stand-in forward):
    the same eval losses and best step.
    (A parameter gather a rank skipped would hang it: --dist-timeout bounds that.)"""
    z3 = work / "z3-eval.json"
    z3.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    out = work / "r2z3"
    r = subprocess.run([TRAIN_RUN, "--nproc", "2", "--shards", str(dataset), "--model",
                        str(model_dir), "--output", str(out), *COMMON, "--zero", "3",
                        "--micro-batch", "1", "--deepspeed", str(z3), "--max-steps", "4",
                        *eval_flags(eval_set), "--save-best", "--no-export",
                        "--dist-timeout", "300"],
                       capture_output=True, text=True, env=clean_env(), timeout=600, cwd=work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "eval loss" in r.stdout
    got = eval_lines(out)
    assert sorted(got) == [0, 2, 4]
    ref = eval_lines(full_run[0])
    for s in (0, 2, 4):
        assert abs(got[s] - ref[s]) < 1e-5, (s, got[s], ref[s])
    assert (out / "checkpoints" / "best").read_text() == \
        (full_run[0] / "checkpoints" / "best").read_text()


def test_resumed_best_is_rewritten_or_forgotten(inproc, tmp_path):
    """After a resume `best` names the checkpoint's own best step (a later one of an abandoned
    branch is dropped); a best measured on another eval set is forgotten."""
    from types import SimpleNamespace

    from train.evaluate import EvalSet, best_after_resume

    ckpts = tmp_path / "checkpoints"
    (ckpts / "step-00000002").mkdir(parents=True)
    (ckpts / "best").write_text("step-00000006\n")
    es = EvalSet(ds=None, packs=7, where="x", identity="abc:7")
    run = SimpleNamespace(args=SimpleNamespace(save_best=True), dist=inproc, out=tmp_path,
                          eval_set=es, best_eval={"step": 2, "eval_loss": 1.0, "eval_set": "abc:7"})
    best_after_resume(run)
    assert (ckpts / "best").read_text() == "step-00000002\n" and run.best_eval["step"] == 2
    run.best_eval["eval_set"] = "other:7"
    best_after_resume(run)
    assert run.best_eval is None


def test_pack_build_split_is_the_default_eval_set(inproc, model_dir, tokenizer_dir, tmp_path):
    """End to end: `pack-build --eval-fraction` writes OUT/eval/, and train-run on OUT evaluates
    on it without being told (step 0 and the end), over exactly its label tokens."""
    from helpers import exchanges_jsonl
    from pack.cli import build_main
    from pack.format import read_manifest
    from train.loop import train

    corpus = exchanges_jsonl(tmp_path / "ex.jsonl", 60)
    data = tmp_path / "data"
    assert build_main([str(corpus), str(data), "--tokenizer", str(tokenizer_dir), "--quiet",
                       "--workers", "1", "--max-length", "128", "--eval-fraction", "0.25"]) == 0
    held_out = read_manifest(str(data / "eval"))
    out = tmp_path / "run"
    summary = train(run_args(data, model_dir, out, *EVAL, "--max-steps", "2"))
    lines = eval_lines(out)
    assert sorted(lines) == [0, 2] and summary["eval_loss"] == lines[2]
    tokens = {m["step"]: m["eval_tokens"] for m in metrics(out) if "eval_tokens" in m}
    assert tokens[0] == tokens[2] == held_out["stats"]["label_tokens"]
