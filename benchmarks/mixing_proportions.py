"""Mixing proportions: does `train-run --shards A --shards B ... --mix W` train on each dataset's
weight share of the tokens?

Claim: over one epoch of a mixture, each dataset's share of the trained tokens (as train-run itself
reports it in metrics.jsonl, `tokens/<name>` summed over the epoch's steps) is within 1 percentage
point of its weight, for the default (by tokens) and for weights that strongly up- and down-sample.

Setup (offline): three disjoint slices of real chitchat exchanges (sizes --records) packed by
`pack-build` at --max-length with the real Llama 3 tokenizer and chat template; a tiny random Llama
(hidden 32, 2 layers); `train-run` (a subprocess, the product as users run it) for one epoch per
weight set, fp32, ZeRO 0, --micro-batch. The last step of an epoch wraps around to the epoch's first
packs (train.data): those repeats are counted in the "trained" share and left out of the "epoch"
share (the epoch's picks proper), both shown.

    python benchmarks/mixing_proportions.py            # prints a table, writes results/mixing_proportions.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, environment, table, write_json

WEIGHT_SETS = ["tokens", "0.5,0.3,0.2", "0.1,0.1,0.8", "0.8,0.1,0.1"]


def bin_of(name: str) -> str:
    """A console script of this Python's environment (the product, as installed)."""
    return str(Path(sys.executable).parent / name)


def exchanges(limit: int) -> list[dict]:
    """Single user/assistant exchanges from real chitchat conversations (short samples)."""
    from pack.offline import chitchat_conversations

    out = []
    for rec in chitchat_conversations():
        msgs = rec["messages"]
        out.extend({"messages": msgs[i:i + 2]} for i in range(0, len(msgs) - 1, 2))
        if len(out) >= limit:
            return out[:limit]
    return out


def make_datasets(work: Path, sizes: list[int], max_length: int, tok: Path) -> list[Path]:
    records = exchanges(sum(sizes))
    out, start = [], 0
    for i, n in enumerate(sizes):
        src = work / f"src{i}.jsonl"
        src.write_text("".join(json.dumps(c) + "\n" for c in records[start:start + n]))
        start += n
        ds = work / f"part{i}"
        subprocess.run([bin_of("pack-build"), str(src), str(ds), "--tokenizer", str(tok),
                        "--max-length", str(max_length), "--quiet", "--workers", "1"],
                       check=True)
        out.append(ds)
    return out


def run_mixture(datasets: list[Path], model: Path, out: Path, weights: str,
                micro_batch: int) -> list[dict]:
    cmd = [bin_of("train-run"), *[x for d in datasets for x in ("--shards", str(d))],
           "--model", str(model), "--output", str(out), "--epochs", "1", "--dtype", "fp32",
           "--zero", "0", "--no-export", "--micro-batch", str(micro_batch), "--log-every", "1000"]
    if weights != "tokens":
        cmd += ["--mix", weights]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def epoch_repeats(run_json: dict, datasets: list[Path], steps: int, micro_batch: int) -> list[int]:
    """Tokens of each dataset trained twice by the last step's wrap-around (from the same plan
    train-run follows: train.mixture, a pure function of the seed, weights and pack lengths)."""
    import numpy as np

    from pack.format import PackedDataset
    from train.mixture import MixtureStream

    weights = [d["weight"] for d in run_json["datasets"]]
    plan = MixtureStream([PackedDataset(d) for d in datasets], weights, micro_batch=micro_batch)
    size, order = plan.epoch_size(0), plan.order(0)
    lengths = np.concatenate(plan.lengths)
    extra = order[np.arange(size, steps * micro_batch) % size]
    which = np.searchsorted(plan.offsets, extra, side="right") - 1
    return np.bincount(which, weights=lengths[extra], minlength=len(datasets)).astype(int).tolist()


def measure(datasets: list[Path], model: Path, work: Path, weights: str, micro_batch: int) -> dict:
    out = work / f"run-{weights.replace(',', '_')}"
    t0 = time.perf_counter()
    rows = run_mixture(datasets, model, out, weights, micro_batch)
    seconds = time.perf_counter() - t0
    info = json.loads((out / "run.json").read_text())
    names = [d["name"] for d in info["datasets"]]
    trained = [sum(r[f"tokens/{n}"] for r in rows) for n in names]
    repeats = epoch_repeats(info, datasets, len(rows), micro_batch)
    epoch = [t - r for t, r in zip(trained, repeats)]
    per = []
    for i, d in enumerate(info["datasets"]):
        per.append({"name": d["name"], "weight": d["weight"], "dataset_tokens": d["tokens"],
                    "trained_tokens": trained[i], "epoch_tokens": epoch[i],
                    "trained_share": trained[i] / sum(trained), "epoch_share": epoch[i] / sum(epoch),
                    "passes": epoch[i] / d["tokens"]})
    return {"weights": weights, "steps": len(rows), "seconds": round(seconds, 1), "datasets": per,
            "max_abs_error_epoch": max(abs(p["epoch_share"] - p["weight"]) for p in per),
            "max_abs_error_trained": max(abs(p["trained_share"] - p["weight"]) for p in per)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", default="400,150,50",
                    help="user/assistant exchanges per dataset (comma-separated)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--weights", nargs="+", default=WEIGHT_SETS,
                    help="weight sets ('tokens' = the default, by tokens)")
    ap.add_argument("--out", default="mixing_proportions.json",
                    help="file name under benchmarks/results/")
    args = ap.parse_args(argv)
    try:
        sizes = [int(x) for x in args.records.split(",")]
    except ValueError:
        ap.error(f"--records {args.records}: comma-separated integers")
    from pack.offline import llama3_tokenizer_dir
    from train.tiny import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="mixing-") as tmp:
        work = Path(tmp)
        tok = llama3_tokenizer_dir(work / "tok")
        model = make_tiny_model("llama", tok, work / "model", hidden=32, layers=2, heads=4,
                                kv_heads=2, seed=0)
        datasets = make_datasets(work, sizes, args.max_length, tok)
        results = [measure(datasets, model, work, w, args.micro_batch) for w in args.weights]
    rows = [{"weights": r["weights"], **p, "steps": r["steps"]} for r in results
            for p in r["datasets"]]
    print(table(rows, [("weights", "weights", "s"), ("name", "dataset", "s"),
                       ("dataset_tokens", "dataset tok", ",d"), ("weight", "weight", ".3f"),
                       ("epoch_tokens", "epoch tok", ",d"), ("passes", "passes", ".2f"),
                       ("epoch_share", "epoch share", ".4f"),
                       ("trained_share", "trained share", ".4f"), ("steps", "steps", "d")]))
    worst = max(r["max_abs_error_epoch"] for r in results)
    print(f"largest |epoch share - weight|: {worst:.4f}")
    path = write_json(args.out, {"benchmark": "mixing_proportions", "environment": environment(),
                                 "records": sizes, "max_length": args.max_length,
                                 "micro_batch": args.micro_batch, "results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
