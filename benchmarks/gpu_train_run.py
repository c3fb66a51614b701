#!/usr/bin/env python
"""train-run itself on one GPU: pack-build makes packs at each size from a synthetic corpus (the
real Llama 3 tokenizer), then `train-run` trains a random-weight model in bf16 with ZeRO 2 and 3
for a few steps; tokens/s is the median of metrics.jsonl's per-step rate after the warm-up
steps, MFU = (6 * N * tokens + causal attention flops) / s / peak (N: matmul parameters, head
once). Rows sit next to the bare loop's and unpacked one-sample steps of gpu_check.py when its
JSON (--bare) is there. Variants (--variants): `base` (--kernels none), `liger` (--kernels liger:
liger-kernel's RMSNorm, RoPE, SwiGLU), `liger-flce` (and its fused linear cross-entropy) and
`compile` (--compile), the variants at ZeRO 2 only, each right after the base row of its size.
Run by benchmarks/gpu_check.sh; `--cpu-smoke` runs the same path on CPU with a tiny model (base at
ZeRO 2 and 3, compile at ZeRO 2; numbers mean nothing, MFU n/a).

  python benchmarks/gpu_train_run.py [--cpu-smoke] [--sizes 2048,32768] [--models qwen0.5b]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {  # Qwen2.5 shapes: hidden, layers, heads, kv heads, intermediate (vocab 151936, tied)
    "qwen0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864),
    "qwen1.5b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960),
    "tiny": dict(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64),
}
PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16
WORDS = ("the a of to and in is it you that he was for on are with as I his they be at one have "
         "this from or had by hot word but what some we can out other were all there when up use "
         "your how said an each she which do their time if will way about many then them").split()


def corpus(path: Path, records: int, seed: int) -> Path:
    """Alpaca records of lognormal length (median ~250 tokens, capped), deterministic."""
    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for n in np.minimum(rng.lognormal(np.log(200), 0.9, records), 1800).astype(int):
            words = rng.choice(WORDS, size=max(int(n), 4))
            cut = max(1, len(words) // 4)
            f.write(json.dumps({"instruction": " ".join(words[:cut]), "input": "",
                                "output": " ".join(words[cut:])}) + "\n")
    return path


def sh(cmd: list[str], log: Path, timeout: float) -> None:
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO)
    if p.returncode:
        tail = log.read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"{Path(cmd[2]).name if len(cmd) > 2 else cmd} exit {p.returncode}: "
                           + " | ".join(tail))


def cli(module: str, fn: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; from {module} import {fn} as m; sys.exit(m())"]


def matmul_params(shape: dict, vocab: int) -> int:
    h, kvh = shape["hidden"], shape["hidden"] // shape["heads"] * shape["kv_heads"]
    per_layer = 2 * h * h + 2 * h * kvh + 3 * h * shape["intermediate"]
    return shape["layers"] * per_layer + vocab * h


def attention_flops_per_token(dataset: Path, shape: dict) -> float:
    """6 * layers * hidden * sum(L_i^2) / tokens over the dataset's packs (causal, useful only)."""
    from pack.format import PackedDataset

    ds = PackedDataset(dataset)
    sq = tokens = 0
    for i in range(len(ds)):
        cu = [int(x) for x in ds[i]["cu_seqlens"]]
        sq += sum((b - a) ** 2 for a, b in zip(cu, cu[1:]))
        tokens += cu[-1]
    return 6 * shape["layers"] * shape["hidden"] * sq / max(tokens, 1)


def bare_rows(path: Path | None) -> dict:
    """gpu_check.py's throughput rows by pack size (best packed backend) and its unpacked row."""
    if not path or not path.is_file():
        return {}
    rows = json.loads(path.read_text()).get("sections", {}).get("throughput", {}).get("rows", [])
    out: dict = {}
    for r in rows:
        if "tokens_per_s" not in r or "dense" in r["mode"]:
            continue
        key = r.get("pack_size") or "unpacked"
        if key not in out or r["tokens_per_s"] > out[key]["tokens_per_s"]:
            out[key] = r
    return out


VARIANTS = {"base": ["--kernels", "none"], "liger": ["--kernels", "liger"],
            "liger-flce": ["--kernels", "liger-flce"], "compile": ["--kernels", "none", "--compile"]}


def plan(args) -> list[tuple[str, int, int, str]]:
    """(model, pack size, ZeRO, variant) in run order: a size's variants right after its base
    ZeRO-2 row, so that a run cut short by the budget still compares them."""
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    out = []
    for name in args.models.split(","):
        for size in (int(x) for x in args.sizes.split(",")):
            for zero in (int(z) for z in args.zero.split(",")):
                if "base" in variants:
                    out.append((name, size, zero, "base"))
                if zero == 2:
                    out += [(name, size, zero, v) for v in variants if v != "base"]
    return out


def run_dir(work: Path, model_name: str, size: int, zero: int, variant: str) -> Path:
    return work / (f"run-{model_name}-{size}-z{zero}" + ("" if variant == "base" else f"-{variant}"))


def measure(args, work: Path, tok: Path, model_name: str, size: int, zero: int,
            variant: str = "base") -> dict:
    row = {"model": model_name, "pack_size": size, "zero": zero, "variant": variant}
    data = work / f"packs-{size}"
    if not (data / "manifest.json").is_file():
        sh([*cli("pack.cli", "build_main"), str(work / "corpus.jsonl"), str(data), "--tokenizer",
            str(tok), "--template", "alpaca", "--max-length", str(size), "--quiet", "--workers", "1"],
           work / f"pack-{size}.log", args.budget_s)
    model = work / f"model-{model_name}"
    out = run_dir(work, model_name, size, zero, variant)
    t0 = time.perf_counter()
    sh([*cli("train.cli", "run_main"), "--shards", str(data), "--model", str(model), "--output",
        str(out), "--zero", str(zero), "--dtype", args.dtype, "--max-steps", str(args.steps),
        "--micro-batch", "1", "--grad-accum", "1", "--no-export", "--log-every", "1000",
        *VARIANTS[variant]], out.with_suffix(".log"), args.budget_s)
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = steps[args.warmup:] or steps[-1:]
    tps = statistics.median(s["tokens_per_s"] for s in timed)
    row.update(wall_s=round(time.perf_counter() - t0, 1), steps=len(steps), timed_steps=len(timed),
               tokens_per_step=statistics.mean(s["tokens"] for s in timed), tokens_per_s=tps,
               final_loss=steps[-1]["loss"])
    if args.peak_tflops:
        shape = SHAPES[model_name]
        flops_tok = 6 * matmul_params(shape, args.vocab) + attention_flops_per_token(data, shape)
        row["mfu"] = tps * flops_tok / (args.peak_tflops * 1e12)
    return row


def table(rows: list[dict], bare: dict) -> str:
    lines = [f"{'model':9s} {'pack':>6s} {'ZeRO':>4s} {'variant':10s} {'train-run tok/s':>15s} "
             f"{'MFU':>6s} {'bare loop tok/s':>15s} {'x bare':>6s} {'x unpacked':>10s}"]
    unpacked = bare.get("unpacked", {}).get("tokens_per_s")
    for r in rows:
        head = f"{r['model']:9s} {r['pack_size']:6d} {r['zero']:4d} {r.get('variant', 'base'):10s}"
        if "tokens_per_s" not in r:
            lines.append(f"{head}  {r.get('error') or r.get('skipped')}")
            continue
        tps, b = r["tokens_per_s"], bare.get(r["pack_size"], {}).get("tokens_per_s")
        mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "n/a"
        bare_s, x_bare = (f"{b:,.0f}", f"{tps / b:.2f}") if b else ("n/a", "n/a")
        x_unp = f"{tps / unpacked:.2f}" if unpacked else "n/a"
        lines.append(f"{head} {tps:15,.0f} {mfu:>6s} {bare_s:>15s} {x_bare:>6s} {x_unp:>10s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, 256/512 packs, on CPU")
    p.add_argument("--models", default="qwen0.5b,qwen1.5b")
    p.add_argument("--sizes", default="2048,8192,32768")
    p.add_argument("--zero", default="2,3")
    p.add_argument("--variants", default="base,liger,compile",
                   help="base (--kernels none), liger, liger-flce, compile; not base: ZeRO 2 only")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    p.add_argument("--records", type=int, default=6000, help="corpus records")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    p.add_argument("--budget-s", type=float, default=300.0, help="start no run after this")
    p.add_argument("--bare", default=None, help="gpu_check.py's JSON (bare loop, unpacked rows)")
    p.add_argument("--work", default=None, help="scratch directory (default: under the output's)")
    p.add_argument("--out", default=None, help="JSON (default $OUT/gpu_train_run.json, else "
                                               "benchmarks/results/)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.models, args.sizes, args.steps, args.warmup, args.records = "tiny", "256", 3, 1, 120
        args.variants = "base,compile"  # liger needs CUDA
        args.dtype, args.peak_tflops = "fp32", None
    else:
        args.dtype = "bf16"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(args.out or Path(os.environ.get("OUT") or REPO / "benchmarks" / "results")
               / "gpu_train_run.json")
    work = Path(args.work or out.parent / "gpu_train_run_work")
    work.mkdir(parents=True, exist_ok=True)
    from pack.offline import llama3_tokenizer_dir
    from train.tiny import make_tiny_model

    tok = llama3_tokenizer_dir(work / "tokenizer")
    corpus(work / "corpus.jsonl", args.records, seed=0)
    args.vocab = 151936 if not args.cpu_smoke else None
    t0, rows = time.perf_counter(), []
    result = {"cpu_smoke": args.cpu_smoke, "dtype": args.dtype, "steps": args.steps,
              "warmup": args.warmup, "peak_tflops": args.peak_tflops, "rows": rows}
    for name, size, zero, variant in plan(args):
        if not (work / f"model-{name}" / "config.json").is_file():
            make_tiny_model("qwen2", tok, work / f"model-{name}", vocab_size=args.vocab,
                            tie_word_embeddings=True, dtype="float32" if args.cpu_smoke
                            else "bfloat16", **SHAPES[name])
        left = args.budget_s - (time.perf_counter() - t0)
        try:
            if left < 20:
                raise TimeoutError(f"skipped: time budget ({left:.0f}s left)")
            rows.append(measure(args, work, tok, name, size, zero, variant))
        except Exception as e:  # noqa: BLE001 - one row's failure keeps the others
            rows.append({"model": name, "pack_size": size, "zero": zero, "variant": variant,
                         "error": f"{type(e).__name__}: {e}"[:300]})
        print(table(rows[-1:], {}).splitlines()[-1], flush=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print("\ntrain-run" + (" (CPU smoke: numbers mean nothing)" if args.cpu_smoke else
                           f", MFU against {args.peak_tflops} TFLOP/s bf16 dense"))
    print(table(rows, bare_rows(Path(args.bare) if args.bare else None)))
    print(f"JSON: {out}")
    return 0 if all("tokens_per_s" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
