#!/usr/bin/env python
"""Packed DPO on CPU beside TRL's DPOTrainer: tokens/s and pairs/s on the same pairs and model.

Claim: train-run --objective dpo on packtrain's preference packs (pairs packed whole, per-segment
varlen attention, chunked head) trains more pairs per second than TRL's DPOTrainer on the same
pairs, the same model and the same optimizer steps; and with the reference log-probs stored once
by pack-ref, a step skips the reference forward.

Setup (all offline): preference pairs made from real chitchat conversations (prompt = the last
turns up to a user turn, chosen = the real reply, rejected = the reply at the same place of
another conversation), the real Llama 3 tokenizer and chat template, `pack-build` packs them
(format 2.1, kind preference). A random-weight Llama layout (--size; small: hidden 128 x 2
layers, 4/2 heads, ~33M parameters, most in the 128k-vocabulary embedding and head), fp32, CPU,
--threads torch threads in every row, beta --beta, AdamW lr --lr constant, betas (0.9, 0.95),
no weight decay, gradient clipping 1.0, sigmoid DPO loss, mean over the pairs of a step.

Same pairs, same steps: TRL gets the packed dataset's own tokens (prompt = a segment's tokens
before its first label, completion = the rest) through its DataCollatorForPreference, and its
optimizer steps are exactly train-run's steps: the pairs of the packs train-run's data stream
(train.data.PackStream, seed 0) gives each step, in that order (one batch per step, as many pairs
as the step's packs hold). So both compute the same losses (the first step's is ln 2 in every row:
policy = reference) and the table shows the first steps' losses side by side.

Rows (each a separate process, as its users run it):
  TRL DPOTrainer                TRL 1.16 defaults except fp32 and no gradient checkpointing (like
                                train-run; TRL's default checkpointing adds a recompute pass):
                                right-padding of the 2B rows of a batch to the longest, sdpa
                                attention, its fused chunked LM head, a reference model copy.
                                padding_free=True is not run: TRL 1.16 warns and falls back to
                                padding (recorded in the JSON).
  TRL DPOTrainer precomputed    precompute_ref_log_probs=True: TRL's reference pass over the
                                dataset before training (its time reported as the ref pass)
  train-run dpo, live ref       train-run --objective dpo, the reference forward in every step
  train-run dpo, stored ref     the same after pack-ref stored the reference log-probs (pack-ref's
                                own time reported as the ref pass)

Timing: per optimizer step, after --warmup steps: TRL between consecutive on_step_end callbacks
(data collation included), train-run from its metrics.jsonl (tokens / tokens_per_s of each step:
data reading included). tokens = real tokens of the step (prompt + chosen + prompt + rejected,
no padding), pairs = pairs of the step. Rates per round are the timed steps' totals over their
seconds; reported: median over --rounds (round-robin, so load from other processes hits all rows
alike) with the range. Also each row's process wall time (imports, model load, checks, ref pass).

    python benchmarks/dpo_vs_trl.py [--pairs 120] [--max-length 1024] [--rounds 2] [--rows live,stored]
    python benchmarks/dpo_vs_trl.py --smoke          # minutes: tiny model, 3 steps, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import cpu_name, table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "dpo_vs_trl.json"
SIZES = {
    "small": dict(arch="llama", hidden=128, layers=2, heads=4, kv_heads=2, intermediate=512),
    "tiny": dict(arch="llama", hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64),  # --smoke
}
ROWS = (("trl", "TRL DPOTrainer"), ("trl_pre", "TRL DPOTrainer, precomputed ref"),
        ("live", "train-run dpo, live ref"), ("stored", "train-run dpo, stored ref (pack-ref)"))
LOSS_STEPS = 5  # first steps' losses shown side by side


# ------------------------------------------------------------------ data

def write_pairs(path: Path, n: int, max_chars: int = 700) -> Path:
    """`n` preference pairs from real chitchat conversations, TRL's conversational format:
    prompt = up to three turns ending on a user turn, chosen = the real reply, rejected = the reply
    at the same turn of the next usable conversation (a real reply, to another context)."""
    from pack.offline import chitchat_conversations

    cands = []  # (prompt messages, reply)
    for rec in chitchat_conversations():
        m = rec["messages"]
        for i in range(0, len(m) - 1, 2):
            prompt = m[max(0, i - 2):i + 1]
            if sum(len(x["content"]) for x in prompt) + len(m[i + 1]["content"]) <= max_chars:
                cands.append((prompt, m[i + 1]["content"]))
                break  # one pair per conversation: varied prompts
        if len(cands) > n:
            break
    if len(cands) <= n:
        raise SystemExit(f"only {len(cands) - 1} pairs available, {n} asked")
    with open(path, "w") as f:
        for k in range(n):
            prompt, chosen = cands[k]
            rejected = cands[k + 1][1]
            f.write(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                                "rejected": [{"role": "assistant", "content": rejected}]}) + "\n")
    return path


def cli(module: str, fn: str) -> list[str]:
    """A console script of this checkout (pack-build, train-run, pack-ref) as `python -c`."""
    return [sys.executable, "-c", f"import sys; from {module} import {fn} as m; sys.exit(m())"]


def sh(cmd: list[str], log: Path, env: dict, timeout: float = 3600) -> float:
    """Run `cmd` (output to `log`); its wall seconds. A failure ends the benchmark with the
    log's last lines."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout)
    if p.returncode:
        tail = " | ".join(log.read_text().strip().splitlines()[-4:])
        raise SystemExit(f"{log.stem}: exit {p.returncode}: {tail}")
    return time.perf_counter() - t0


def step_pairs(data: Path, steps: int) -> list[list[dict]]:
    """The pairs of each of train-run's first `steps` optimizer steps (1 rank, 1 pack per step,
    seed 0), as TRL's tokenized fields: prompt = the segment's tokens before its first label,
    chosen/rejected = the rest. Refuses data where that split would not reproduce the labels."""
    import numpy as np

    from pack.format import PackedDataset
    from train.data import PackStream

    ds = PackedDataset(data)
    stream = PackStream(ds, seed=0)
    out = []
    for _ in range(steps):
        micro, _ = stream.next_step()  # one micro-step of one pack
        ids = micro[0].pack_ids[0]
        p = ds[ids]
        cu, tok, lab = p["cu_seqlens"], p["input_ids"], p["labels"]
        pairs = []
        for k in range(0, len(cu) - 1, 2):
            segs = []
            for s, e in ((cu[k], cu[k + 1]), (cu[k + 1], cu[k + 2])):
                first = s + int(np.flatnonzero(lab[s:e] != -100)[0])
                if not (lab[first:e] == tok[first:e]).all():
                    raise SystemExit(f"{data}: pack {ids}: labels are not a suffix of the segment; "
                                     f"TRL's completion mask could not match them")
                segs.append((tok[s:first].tolist(), tok[first:e].tolist()))
            (pc, c), (pr, r) = segs
            if pc != pr:
                raise SystemExit(f"{data}: pack {ids}: chosen and rejected prompts differ")
            pairs.append({"prompt_ids": pc, "chosen_ids": c, "rejected_ids": r,
                          "tokens": 2 * len(pc) + len(c) + len(r)})
        out.append(pairs)
    return out


# ------------------------------------------------------------------ the TRL rows (own process)

def trl_worker(spec_path: Path) -> int:
    """One TRL row: DPOTrainer over `spec`'s step batches; writes per-step marks and logs."""
    t_proc = time.perf_counter()
    spec = json.loads(spec_path.read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    steps = spec["steps"]
    flat = [p for batch in steps for p in batch]
    ds = Dataset.from_list([{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in flat])
    bounds, n = [], 0
    for batch in steps:
        bounds.append(list(range(n, n + len(batch))))
        n += len(batch)
    marks, tokens, timing = [], [], {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

    class SameSteps(DPOTrainer):
        """DPOTrainer given train-run's steps: pre-tokenized pairs (the packed dataset's tokens),
        one batch per optimizer step holding that step's pairs, in that order."""

        def _prepare_dataset(self, dataset, *a, **k):
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            timing["ref_pass_s"] = time.perf_counter() - t0
            return out

        def get_train_dataloader(self):
            collate = self.data_collator

            def counting(features):
                batch = collate(features)
                tokens.append(int(batch["attention_mask"].sum()))
                return batch
            data = self._remove_unused_columns(self.train_dataset, description="training")
            return self.accelerator.prepare(DataLoader(data, batch_sampler=bounds, collate_fn=counting))

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    mean_batch = max(1, round(len(flat) / len(steps)))
    args = DPOConfig(output_dir=spec["work"], max_steps=len(steps), per_device_train_batch_size=mean_batch,
                     learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
                     weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
                     max_grad_norm=1.0, beta=spec["beta"], loss_type=["sigmoid"], max_length=None,
                     bf16=False, gradient_checkpointing=False, use_cpu=True, seed=0,
                     precompute_ref_log_probs=spec["precompute"], precompute_ref_batch_size=mean_batch,
                     dataloader_num_workers=0, save_strategy="no", report_to="none",
                     logging_steps=1, disable_tqdm=True)
    trainer = SameSteps(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    result = {"step_s": [b - a for a, b in zip(marks, marks[1:])], "step_tokens": tokens[:len(steps)],
              "step_pairs": [len(b) for b in steps], "loss": [h["loss"] for h in logs],
              "logps_chosen": [h.get("logps/chosen") for h in logs],
              "logps_rejected": [h.get("logps/rejected") for h in logs],
              "ref_pass_s": timing.get("ref_pass_s"), "process_s": time.perf_counter() - t_proc}
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


def run_trl(work: Path, model: Path, tok: Path, steps: list, a, precompute: bool, env: dict, tag: str) -> dict:
    spec = work / f"{tag}.spec.json"
    out = work / f"{tag}.result.json"
    spec.write_text(json.dumps({"model": str(model), "tokenizer": str(tok), "steps": steps, "lr": a.lr,
                                "beta": a.beta, "precompute": precompute, "threads": a.threads,
                                "work": str(work / f"{tag}-out"), "out": str(out)}))
    wall = sh([sys.executable, __file__, "--trl-worker", str(spec)], work / f"{tag}.log", env)
    r = json.loads(out.read_text())
    r["wall_s"] = wall
    if r.get("ref_pass_s"):
        r["ref_tokens"] = sum(p["tokens"] for batch in steps for p in batch)
    return r


# ------------------------------------------------------------------ the train-run rows

def run_train(work: Path, data: Path, model: Path, steps: list, a, env: dict, tag: str, ref: str) -> dict:
    out = work / tag
    shutil.rmtree(out, ignore_errors=True)
    wall = sh([*cli("train.cli", "run_main"), "--shards", str(data), "--model", str(model), "--output", str(out),
               "--objective", "dpo", "--ref-logps", ref, "--beta", str(a.beta), "--lr", str(a.lr), "--schedule", "constant",
               "--weight-decay", "0", "--grad-clip", "1.0", "--dtype", "fp32", "--max-steps", str(len(steps)),
               "--seed", "0", "--no-export", "--log-every", "1000"], work / f"{tag}.log", env)
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if len(rec) != len(steps):
        raise SystemExit(f"{tag}: {len(rec)} steps in metrics.jsonl, {len(steps)} expected")
    return {"step_s": [r["tokens"] / r["tokens_per_s"] for r in rec], "step_tokens": [r["tokens"] for r in rec],
            "step_pairs": [len(b) for b in steps], "loss": [r["loss"] for r in rec],
            "logps_chosen": [r.get("logps/chosen") for r in rec],
            "logps_rejected": [r.get("logps/rejected") for r in rec], "wall_s": wall, "metrics": rec[:LOSS_STEPS]}


def run_pack_ref(work: Path, data: Path, model: Path, env: dict, tag: str) -> dict:
    """pack-ref on a fresh copy of the dataset (a finished sidecar would be skipped, not timed)."""
    copy = work / tag
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(data, copy)
    wall = sh([*cli("train.pack_ref", "main"), str(model), str(copy), "--dtype", "fp32"], work / f"{tag}.log", env)
    return {"data": copy, "wall_s": wall, "summary": (work / f"{tag}.log").read_text().strip().splitlines()[-1]}


# ------------------------------------------------------------------ summary

def rates(r: dict, warmup: int) -> dict:
    s, t, p = r["step_s"][warmup:], r["step_tokens"][warmup:], r["step_pairs"][warmup:]
    return {"tokens_per_s": sum(t) / sum(s), "pairs_per_s": sum(p) / sum(s), "timed_steps": len(s),
            "timed_tokens": sum(t), "timed_pairs": sum(p), "wall_s": r["wall_s"],
            "ref_pass_s": r.get("ref_pass_s"),
            "ref_tokens_per_s": r["ref_tokens"] / r["ref_pass_s"] if r.get("ref_pass_s") else None}


def summarize(rounds: dict, a, meta: dict) -> dict:
    rows = []
    base = None
    for kind, label in ROWS:
        rs = rounds.get(kind) or []
        if not rs:
            continue
        per = [rates(r, a.warmup) for r in rs]
        med = lambda k: statistics.median(x[k] for x in per)  # noqa: E731
        rng = lambda k: [min(x[k] for x in per), max(x[k] for x in per)]  # noqa: E731
        refs = [x["ref_pass_s"] for x in per if x["ref_pass_s"] is not None]
        ref_rates = [x["ref_tokens_per_s"] for x in per if x["ref_tokens_per_s"] is not None]
        row = {"kind": kind, "mode": label, "rounds_run": len(rs), "tokens_per_s": med("tokens_per_s"),
               "tokens_per_s_range": rng("tokens_per_s"), "pairs_per_s": med("pairs_per_s"),
               "pairs_per_s_range": rng("pairs_per_s"), "wall_s": med("wall_s"),
               "ref_pass_s": statistics.median(refs) if refs else None,
               "ref_tokens_per_s": statistics.median(ref_rates) if ref_rates else None,
               "loss": rs[0]["loss"][:LOSS_STEPS], "rounds": rs}
        rows.append(row)
        if kind == "trl":
            base = row
    for row in rows:
        if base:
            row["x_trl"] = row["pairs_per_s"] / base["pairs_per_s"]
            n = min(len(row["loss"]), len(base["loss"]))
            row["max_loss_diff_vs_trl"] = max(abs(x - y) for x, y in zip(row["loss"][:n], base["loss"][:n]))
        live = next((x for x in rows if x["kind"] == "live"), None)
        if live:
            row["x_live"] = row["pairs_per_s"] / live["pairs_per_s"]
        tokens = [r["step_tokens"] for r in row["rounds"]]
        row["same_tokens_as_trl"] = bool(base) and tokens[0] == base["rounds"][0]["step_tokens"]
    return {**meta, "rows": rows}


def render(res: dict) -> str:
    rows = []
    for r in res["rows"]:
        lo, hi = r["pairs_per_s_range"]
        tlo, thi = r["tokens_per_s_range"]
        rows.append({**r, "tok": f"{r['tokens_per_s']:,.0f} ({tlo:,.0f}-{thi:,.0f})",
                     "prs": f"{r['pairs_per_s']:.2f} ({lo:.2f}-{hi:.2f})",
                     "losses": " ".join(f"{x:.4f}" for x in r["loss"])})
    m = res["model"]
    head = (f"DPO on CPU, {res['threads']} thread(s), fp32: {m['arch']} hidden {m['hidden']} x {m['layers']} layers, "
            f"vocab {m['vocab']:,}, {m['parameters'] / 1e6:.1f}M parameters; {res['pairs']} pairs packed at "
            f"{res['max_length']} into {res['packs']} packs (pack-build {res['pack_build_s']:.1f}s); "
            f"{res['steps']} steps ({res['warmup']} warm-up) x {res['rounds']} rounds, beta {res['beta']}, lr {res['lr']}")
    body = table(rows, [("mode", "row", "s"), ("tok", "tokens/s median (range)", "s"),
                        ("prs", "pairs/s median (range)", "s"), ("x_trl", "x TRL", ".2f"),
                        ("x_live", "x live", ".2f"),
                        ("ref_pass_s", "ref pass s", ".1f"), ("ref_tokens_per_s", "ref pass tok/s", ",.0f"),
                        ("wall_s", "process s", ".1f"),
                        ("losses", f"loss, steps 1-{LOSS_STEPS}", "s")])
    notes = [f"x TRL / x live: pairs/s over TRL DPOTrainer's (live reference) / over train-run's live row. ref pass: TRL's precompute inside its "
             f"process (over the pairs of the steps); pack-ref's own process wall, start-up included (a separate "
             f"command, run once per dataset and model, over every pack); ref pass tok/s: the tokens it covered "
             f"over those seconds.",
             f"padding_free: {res['trl_padding_free']}",
             f"machine: {res['cpu']} ({res['cpus']} cores, shared), torch {res['torch']}, transformers "
             f"{res['transformers']}, trl {res['trl']}; total {res['total_s']:.0f}s"]
    return "\n".join([head, body, *notes])


# ------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--pairs", type=int, default=120)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=0,
                    help="optimizer steps per row, warm-up included (0: one epoch, every pack once, so "
                         "both reference passes cover the pairs trained on)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default=",".join(k for k, _ in ROWS),
                    help="rows to run, comma-separated: " + ", ".join(k for k, _ in ROWS))
    ap.add_argument("--smoke", action="store_true", help="tiny model, 40 pairs at 512, 3 steps, 1 round")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--trl-worker", metavar="SPEC", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.trl_worker:
        return trl_worker(Path(a.trl_worker))
    if a.smoke:
        a.size, a.pairs, a.max_length, a.steps, a.warmup, a.rounds = "tiny", 40, 512, 3, 1, 1
    chosen = [k for k in a.rows.split(",") if k.strip()]
    if not chosen or set(chosen) - {k for k, _ in ROWS}:
        ap.error(f"--rows {a.rows}: choose from {', '.join(k for k, _ in ROWS)}")
    if (a.steps and a.steps <= a.warmup) or a.rounds < 1 or a.pairs < 2 or a.threads < 1:
        ap.error("need --steps > --warmup, --rounds >= 1, --pairs >= 2, --threads >= 1")
    t_start = time.perf_counter()
    import torch
    import transformers
    import trl

    from pack.format import PackedDataset
    from pack.offline import llama3_tokenizer_dir
    from train.tiny import make_tiny_model

    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory(prefix="dpo_vs_trl-") as tmp:
        work = Path(tmp)
        tok = llama3_tokenizer_dir(work / "tok")
        pairs = write_pairs(work / "pairs.jsonl", a.pairs)
        data = work / "packed"
        pack_s = sh([*cli("pack.cli", "build_main"), str(pairs), str(data), "--tokenizer", str(tok),
                     "--max-length", str(a.max_length), "--quiet", "--workers", "1"], work / "pack-build.log", env)
        n_packs = len(PackedDataset(data))
        a.steps = a.steps or n_packs
        if a.steps <= a.warmup:
            raise SystemExit(f"{n_packs} packs: fewer steps than --warmup {a.warmup} + 1; more --pairs")
        if n_packs < a.steps:
            raise SystemExit(f"{a.pairs} pairs make {n_packs} packs at {a.max_length}, fewer than --steps "
                             f"{a.steps}: more --pairs")
        steps = step_pairs(data, a.steps)
        spec = SIZES[a.size]
        model = make_tiny_model(spec["arch"], tok, work / "model", hidden=spec["hidden"], layers=spec["layers"],
                                heads=spec["heads"], kv_heads=spec["kv_heads"], intermediate=spec["intermediate"])
        cfg = transformers.AutoConfig.from_pretrained(str(model))
        n_params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(cfg).parameters())
        meta = {"benchmark": "dpo_vs_trl", "device": "cpu", "threads": a.threads, "size": a.size,
                "model": {**spec, "vocab": cfg.vocab_size, "parameters": n_params, "dtype": "float32"},
                "pairs": a.pairs, "max_length": a.max_length, "packs": n_packs, "pack_build_s": pack_s,
                "steps": a.steps, "warmup": a.warmup, "rounds": a.rounds, "beta": a.beta, "lr": a.lr,
                "trl_padding_free": "not run: TRL 1.16 warns 'padding_free=True is temporarily unavailable' "
                                    "and falls back to padding",
                "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                "python": platform.python_version(), "cpu": cpu_name(), "cpus": os.cpu_count(),
                "argv": sys.argv[1:] if argv is None else list(argv)}
        rounds: dict[str, list] = {k: [] for k, _ in ROWS}
        out = Path(a.out)
        for rnd in range(a.rounds):
            for kind, label in [(k, x) for k, x in ROWS if k in chosen]:
                tag = f"{kind}-{rnd}"
                if kind == "trl":
                    r = run_trl(work, model, tok, steps, a, False, env, tag)
                elif kind == "trl_pre":
                    r = run_trl(work, model, tok, steps, a, True, env, tag)
                elif kind == "live":
                    r = run_train(work, data, model, steps, a, env, tag, "live")
                else:
                    ref = run_pack_ref(work, data, model, env, f"ref-{rnd}")
                    r = run_train(work, ref["data"], model, steps, a, env, tag, "stored")
                    r.update(ref_pass_s=ref["wall_s"], pack_ref_summary=ref["summary"],
                             ref_tokens=int(PackedDataset(data).manifest["stats"]["tokens"]))
                rounds[kind].append(r)
                x = rates(r, a.warmup)
                print(f"  [round {rnd + 1}/{a.rounds}] {label}: {x['tokens_per_s']:,.0f} tok/s, "
                      f"{x['pairs_per_s']:.2f} pairs/s, process {r['wall_s']:.0f}s", file=sys.stderr, flush=True)
                write(summarize(rounds, a, {**meta, "complete": False,
                                            "total_s": time.perf_counter() - t_start}), out, quiet=True)
        res = summarize(rounds, a, {**meta, "complete": True, "total_s": time.perf_counter() - t_start})
    write(res, out)
    return 0


def write(res: dict, out: Path, quiet: bool = False) -> None:
    """JSON and text table, rewritten after every row (complete: false until the end)."""
    text = render(res) if res["rows"] else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(out)
    out.with_suffix(".txt").write_text(text + "\n")
    if not quiet:
        print(text)
        print(f"\nwrote {out}, {out.with_suffix('.txt')}")


if __name__ == "__main__":
    sys.exit(main())
