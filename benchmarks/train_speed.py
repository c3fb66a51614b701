"""Training throughput: unpacked vs padded batches vs packed (varlen) at 2k-32k vs packed (dense mask).

Claim: on the same real samples, training on packs with per-sample (varlen) attention and the
chunked loss processes more real tokens per second than one sample per step or padded batches,
at every pack length from 2k to 32k, and the per-sample attention path beats dense SDPA with a
block-diagonal mask.

Setup (all offline): Alpaca-format records made from real chitchat exchanges (the tests'
alpaca_jsonl fixture logic), the real Llama 3 tokenizer (128,256 + 1 ids) and chat template, packed by
`pack-build` once per --lengths value; a tiny random Llama (hidden 128, 2 layers, the real 128k
vocabulary). Every mode starts from the same weights and uses the same AdamW. The loop is plain
PyTorch (forward, backward, optimizer step): it measures the model step, not DeepSpeed overhead.
CPU, --threads torch threads.

Same samples: one pool of records is packed at every length (enough records that every length has
at least its steps + warm-up *full* packs, fill >= --min-fill; the first full packs in the dataset's
(shuffled) pack order are used). The unpacked and padded modes train on the samples of the packs
used by the shortest packed mode, in pack order.

Modes
  unpacked      one sample per step, HF forward with labels (full logits), sdpa attention
  padded-8      8 consecutive samples padded to the longest, attention mask
  packed <L>    one pack per step: packtrain_sdpa (per-sample SDPA over cu_seqlens) + the chunked
                loss (train.loss.packed_loss), for every L in --lengths
  packed <L> dense  same packs, transformers' own sdpa: dense SDPA with a block-diagonal causal mask
                built from position_ids, same chunked loss; only for L <= --dense-max (4096): the
                [T, T] mask grows quadratically (at 32k: 1 GiB as bool, 4 GiB as an fp32 additive
                mask) and so does the attention work, nearly all of it on masked-out pairs

Steps: --steps timed steps for unpacked, padded and the shortest pack length; a longer pack length L
gets max(--min-steps, round(steps * L_min / L)) timed steps, so every packed mode times about the
same number of tokens (more at 16k/32k, where the minimum applies). --warmup untimed steps first.

tokens/s counts real tokens only (padding excluded). Reported per mode: the median step time, the
median of per-step tokens/s (used for "x unpacked" and the chart) and the aggregate rate (all timed
tokens / all timed time). Peak RSS per mode: the process's VmHWM, reset (/proc/self/clear_refs) just
before the mode's model is loaded, so it covers model + optimizer + batches + steps of that mode
(plus whatever the process already held: the baseline RSS is recorded too). Linux only; else null.

Outputs: benchmarks/results/train_speed.{json,txt,png}.

    python benchmarks/train_speed.py [--lengths 2048,4096,8192,16384,32768] [--steps 16]
                                     [--min-steps 2] [--warmup 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "train_speed.json"
TOKENS_PER_RECORD_GUESS = 80  # low guess (they average ~90 with the chat template): more records, not fewer


def write_inputs(work: Path, records: int) -> list[Path]:
    """The tests' alpaca_jsonl fixture logic: Alpaca records made from real chitchat exchanges
    (instruction = a user turn, input = the turn before it, output = the reply). Short samples
    (~90 tokens), as in instruction tuning, so padded batches stay within memory with full
    128k-vocabulary logits."""
    from pack.offline import chitchat_conversations

    path = work / "alpaca.jsonl"
    n = 0
    with open(path, "w") as f:
        for rec in chitchat_conversations():
            msgs = rec["messages"]
            for i in range(0, len(msgs) - 1, 2):
                f.write(json.dumps({"instruction": msgs[i]["content"],
                                    "input": msgs[i - 1]["content"] if i > 0 else "",
                                    "output": msgs[i + 1]["content"]}) + "\n")
                n += 1
            if n >= records:
                break
    if n < records:
        raise SystemExit(f"only {n} chitchat records available, {records} needed")
    return [path]


def pack_dataset(tok: Path, inputs: list[Path], out: Path, max_length: int) -> Path:
    from pack.cli import build_main

    rc = build_main(["--tokenizer", str(tok), "--max-length", str(max_length), "--quiet",
                     "--overwrite", *map(str, inputs), str(out)])
    if rc not in (0, None):
        raise SystemExit(f"pack-build failed ({rc})")
    return out


def full_packs(packed: Path, min_fill: float) -> list[int]:
    """Indices (dataset order) of the packs holding >= min_fill * max_length tokens."""
    from pack.format import PackedDataset

    ds = PackedDataset(packed)
    return [int(i) for i in np.flatnonzero(ds.lengths() >= min_fill * ds.max_length)]


def samples_of_packs(packed: Path, packs: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The samples of `packs`, in pack order (inside a pack: dataset order)."""
    from pack.format import PackedDataset

    ds = PackedDataset(packed)
    items = []
    for i in packs:
        p = ds[i]
        cu = p["cu_seqlens"]
        for s, e in zip(cu[:-1], cu[1:]):
            items.append((p["input_ids"][s:e].astype(np.int64), p["labels"][s:e].astype(np.int64)))
    return items


def load_model(model_dir: Path, attn: str):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                             attn_implementation="sdpa")
    m.config.use_cache = False
    if attn == "packtrain_sdpa":
        from train.attention import enable_packed_attention

        enable_packed_attention(m, "sdpa")
    m.train()
    return m, torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.0)


def timed_steps(model, opt, batches, warmup: int):
    """Run `batches` (callables returning (loss, real_tokens)); time each full step (wall clock,
    and process CPU time: with one torch thread it is less sensitive to other load on the machine)."""
    times, cpu, tokens = [], [], []
    for i, make in enumerate(batches):
        t0, c0 = time.perf_counter(), time.process_time()
        loss, n_tokens = make(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if i >= warmup:
            times.append(dt)
            cpu.append(dc)
            tokens.append(n_tokens)
    return times, cpu, tokens


def unpacked_batches(samples, k):
    if len(samples) < k:
        raise SystemExit(f"unpacked: {len(samples)} samples, {k} needed")

    def make(ids, labels):
        def f(model):
            out = model(input_ids=torch.from_numpy(ids)[None], labels=torch.from_numpy(labels)[None],
                        use_cache=False)
            return out.loss, len(ids)
        return f
    return [make(i, l) for i, l in samples[:k]], 0.0


def padded_batches(samples, k, size=8):
    if len(samples) < k * size:
        raise SystemExit(f"padded: {len(samples)} samples, {k * size} needed")
    out, pad_total, all_total = [], 0, 0
    for b in range(k):
        group = samples[b * size:(b + 1) * size]
        width = max(len(i) for i, _ in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        lab = torch.full((len(group), width), -100, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for r, (i, l) in enumerate(group):
            ids[r, :len(i)], lab[r, :len(l)], mask[r, :len(i)] = (torch.from_numpy(i),
                                                                 torch.from_numpy(l), 1)
        real = int(mask.sum())
        pad_total += ids.numel() - real
        all_total += ids.numel()

        def f(model, ids=ids, lab=lab, mask=mask, real=real):
            o = model(input_ids=ids, attention_mask=mask, labels=lab, use_cache=False)
            return o.loss, real
        out.append(f)
    return out, pad_total / max(all_total, 1)


def packed_batches(packed: Path, packs: list[int]):
    from pack.format import PackedDataset
    from train.loss import packed_loss

    ds = PackedDataset(packed)
    out, real, room = [], 0, 0
    for i in packs:
        p = ds[i]
        ids = torch.from_numpy(p["input_ids"].astype(np.int64))[None]
        lab = torch.from_numpy(p["labels"].astype(np.int64))[None]
        pos = torch.from_numpy(p["position_ids"].astype(np.int64))[None]
        cu = torch.from_numpy(p["cu_seqlens"].astype(np.int32))
        real += ids.shape[1]
        room += ds.max_length

        def f(model, ids=ids, lab=lab, pos=pos, cu=cu):
            loss, n = packed_loss(model, ids, lab, pos, cu, chunk_size=1024)
            return loss / max(n, 1), ids.shape[1]
        out.append(f)
    return out, 1.0 - real / max(room, 1)  # unused room of the packs (not computed on: no padding)


def _proc_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def short(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["results"] if not r.get("skipped")]
    colors = {"unpacked": "#9e9e9e", "padded": "#f0a030", "varlen": "#2a6fbb", "dense": "#c0392b"}
    fig, ax = plt.subplots(figsize=(max(8.0, 1.0 * len(rows) + 2), 5.2))
    x = np.arange(len(rows))
    vals = [r["median_tokens_per_s"] for r in rows]
    ax.bar(x, vals, color=[colors[r["kind"]] for r in rows])
    top = max(vals)
    for xi, r in zip(x, rows):
        ax.text(xi, r["median_tokens_per_s"] + top * 0.01,
                f"{r['median_tokens_per_s']:,.0f}\n{r['x_unpacked']:.1f}x", ha="center",
                va="bottom", fontsize=8)
    ax.set_xticks(x, [r["label"] for r in rows], rotation=30, ha="right", fontsize=9)
    ax.set_ylabel("real tokens / s (median step)")
    ax.set_ylim(0, top * 1.18)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=colors["unpacked"], label="1 sample / step"),
                       Patch(color=colors["padded"], label="padded batch of 8"),
                       Patch(color=colors["varlen"], label="packed, per-sample SDPA + chunked CE"),
                       Patch(color=colors["dense"], label="packed, dense SDPA + block mask")],
              loc="upper left", fontsize=8)
    m = result["model"]
    skipped = [r for r in result["results"] if r.get("skipped")]
    note = (f"\nnot run: {', '.join(r['label'] for r in skipped)} (dense [T, T] mask beyond "
            f"{short(result['dense_max'])}: quadratic memory and work)" if skipped else "")
    ax.set_title(f"Training throughput, CPU fp32, {result['threads']} thread(s): Llama hidden {m['hidden']} x "
                 f"{m['layers']} layers, {m['heads']}/{m['kv_heads']} heads, vocab {m['vocab']:,}\n"
                 f"{result['cpu']} ({result['cpus']} cores, shared), torch {result['torch']}{note}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768",
                    help="packed max lengths, comma-separated")
    ap.add_argument("--steps", type=int, default=16,
                    help="timed steps for unpacked, padded and the shortest pack length")
    ap.add_argument("--min-steps", type=int, default=2, help="fewest timed steps of any mode")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dense-max", type=int, default=4096,
                    help="dense SDPA + block mask only for pack lengths up to this")
    ap.add_argument("--min-fill", type=float, default=0.95,
                    help="a pack counts as full when it holds this fraction of max_length")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    lengths = sorted({int(x) for x in a.lengths.split(",") if x.strip()})
    if not lengths or a.steps < 1 or a.min_steps < 1:
        ap.error("need at least one length and steps >= 1")
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    from pack.offline import llama3_tokenizer_dir
    from train.tiny import make_tiny_model

    l0 = lengths[0]
    steps = {L: max(a.min_steps, round(a.steps * l0 / L)) for L in lengths}
    steps[l0] = max(steps[l0], a.steps)
    need = {L: steps[L] + a.warmup for L in lengths}
    n0 = a.steps + a.warmup  # unpacked and padded steps
    heads, kv_heads = 4, 2

    with tempfile.TemporaryDirectory(prefix="train_speed-") as tmp:
        work = Path(tmp)
        tok = llama3_tokenizer_dir(work / "tok")
        # one pool of records for every length: (need + 1) packs' worth of tokens at each length,
        # grown until every length has `need` full packs
        records = math.ceil(max((need[L] + 1) * L for L in lengths) / TOKENS_PER_RECORD_GUESS)
        for _ in range(6):
            inputs = write_inputs(work, records)
            data = {L: pack_dataset(tok, inputs, work / f"packed-{L}", L) for L in lengths}
            full = {L: full_packs(data[L], a.min_fill) for L in lengths}
            chosen = {L: full[L][:need[L]] for L in lengths}
            # unpacked/padded: the samples of the shortest length's full packs, timed packs first
            samples = samples_of_packs(data[l0], full[l0])
            short_of = [L for L in lengths if len(chosen[L]) < need[L]]
            if not short_of and len(samples) >= 8 * n0:
                break
            print(f"  {records} records: too few full packs at {short_of} or samples "
                  f"({len(samples)} of {8 * n0}); more records", file=sys.stderr, flush=True)
            records = int(records * 1.5)
        else:
            raise SystemExit("could not get enough full packs")
        print(f"  {records} records packed at {', '.join(map(short, lengths))} "
              f"({time.perf_counter() - t_start:.0f}s)", file=sys.stderr, flush=True)

        model_dir = make_tiny_model("llama", tok, work / "model", hidden=a.hidden,
                                    layers=a.layers, heads=heads, kv_heads=kv_heads, seed=0)
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(model_dir))
        modes = [
            ("unpacked (1 sample/step)", "unpacked", "unpacked", "sdpa", None,
             lambda: unpacked_batches(samples, n0)),
            ("padded batches of 8", "padded x8", "padded", "sdpa", None,
             lambda: padded_batches(samples, n0)),
        ]
        # run order: varlen and dense of one length back to back (similar machine load); the table
        # and chart list all varlen lengths first
        for L in lengths:
            modes.append((f"packed {short(L)}, varlen", f"packed {short(L)}", "varlen",
                          "packtrain_sdpa", L, lambda L=L: packed_batches(data[L], chosen[L])))
            modes.append((f"packed {short(L)}, dense SDPA + block mask", f"packed {short(L)} dense",
                          "dense", "sdpa", L,
                          (lambda L=L: packed_batches(data[L], chosen[L])) if L <= a.dense_max else None))

        rows = []
        for name, label, kind, attn, L, make in modes:
            row = {"mode": name, "label": label, "kind": kind, "attention": attn, "max_length": L}
            if make is None:
                row.update(skipped=True, reason=(
                    f"beyond --dense-max {short(a.dense_max)}: the block mask is [T, T] ({L * L / 2**30:.3g} GiB "
                    f"as bool, {L * L * 4 / 2**30:.3g} GiB as an fp32 additive mask at {short(L)}) and dense SDPA "
                    f"does all T x T query-key pairs ({(L / a.dense_max) ** 2:.0f}x the {short(a.dense_max)} work "
                    "per pack) though almost all are masked out; the varlen path needs neither"))
                rows.append(row)
                print(f"  {name}: skipped", file=sys.stderr, flush=True)
                continue
            t_mode = time.perf_counter()
            batches, pad = make()
            gc.collect()
            rss_before = _proc_status("VmRSS")
            peak_ok = reset_peak_rss()
            model, opt = load_model(model_dir, attn)
            times, cpu, tokens = timed_steps(model, opt, batches, a.warmup)
            peak = _proc_status("VmHWM") if peak_ok else None
            rates = [t / s for t, s in zip(tokens, times)]
            row.update({"steps": len(times), "warmup": a.warmup,
                        "tokens_per_s": sum(tokens) / sum(times),
                        "median_tokens_per_s": statistics.median(rates),
                        "median_step_s": statistics.median(times),
                        "median_step_cpu_s": statistics.median(cpu),
                        "tokens_per_cpu_s": sum(tokens) / sum(cpu),
                        "step_s": times, "step_cpu_s": cpu, "step_tokens": tokens,
                        "real_tokens_per_step": sum(tokens) / len(tokens),
                        "timed_tokens": sum(tokens),
                        "padding_fraction": pad if kind in ("unpacked", "padded") else 0.0,
                        "unused_pack_room": pad if kind in ("varlen", "dense") else None,
                        "rss_before_mb": rss_before / 2**20 if rss_before else None,
                        "peak_rss_mb": peak / 2**20 if peak else None,
                        "mode_wall_s": time.perf_counter() - t_mode})
            rows.append(row)
            print(f"  {name}: {row['median_tokens_per_s']:,.0f} tokens/s (median of {len(times)}), "
                  f"{row['mode_wall_s']:.0f}s", file=sys.stderr, flush=True)
            del model, opt, batches
            gc.collect()

    order = {"unpacked": 0, "padded": 1, "varlen": 2, "dense": 3}
    rows.sort(key=lambda r: (order[r["kind"]], r["max_length"] or 0))  # stable; unpacked first
    base = rows[0]["median_tokens_per_s"]
    base_agg = rows[0]["tokens_per_s"]
    for r in rows:
        if not r.get("skipped"):
            r["x_unpacked"] = r["median_tokens_per_s"] / base
            r["x_unpacked_aggregate"] = r["tokens_per_s"] / base_agg
            r["x_unpacked_cpu"] = r["tokens_per_cpu_s"] / rows[0]["tokens_per_cpu_s"]
    wall = time.perf_counter() - t_start

    head = (f"Training throughput on CPU (plain PyTorch loop: model step only, no DeepSpeed overhead); "
            f"{a.threads} thread(s), Llama hidden {a.hidden} x {a.layers} layers, {heads}/{kv_heads} heads, "
            f"intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size:,}, fp32; {cpu_name()}\n"
            f"steps: {a.warmup} warm-up + timed {', '.join(f'{short(L)}: {steps[L]}' for L in lengths)} "
            f"(unpacked/padded: {a.steps}); same record pool ({records} records) packed at every length\n")
    cols = (f"{'mode':40} {'steps':>5} {'step s':>8} {'tok/step':>9} {'tokens/s':>9} {'agg tok/s':>9} "
            f"{'x unpacked':>10} {'cpu tok/s':>9} {'pad':>6} {'peak RSS':>9}")
    lines = [head, cols, "-" * len(cols)]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"{r['mode']:40} skipped: {r['reason']}")
            continue
        rss = f"{r['peak_rss_mb']:,.0f} MB" if r["peak_rss_mb"] else "-"
        lines.append(f"{r['mode']:40} {r['steps']:>5} {r['median_step_s']:>8.3f} "
                     f"{r['real_tokens_per_step']:>9,.0f} {r['median_tokens_per_s']:>9,.0f} "
                     f"{r['tokens_per_s']:>9,.0f} {r['x_unpacked']:>9.2f}x {r['tokens_per_cpu_s']:>9,.0f} "
                     f"{r['padding_fraction']:>6.1%} "
                     f"{rss:>9}")
    lines.append("\ntokens/s: median of per-step rates (real tokens); agg: all timed tokens / all timed "
                 "time; cpu tok/s: timed tokens / process CPU seconds (less sensitive to load from other "
                 "processes); pad: padding share of padded batches; peak RSS: process VmHWM during the mode "
                 "(reset before loading its model)")
    lines.append(f"total run time {wall:.0f}s")
    text = "\n".join(lines)
    print("\n" + text)

    result = {
        "benchmark": "train_speed",
        "note": "plain PyTorch loop (forward+backward+AdamW step); measures the model step, not "
                "DeepSpeed overhead. tokens/s counts real tokens (no padding); median_tokens_per_s is the "
                "median of per-step rates and x_unpacked uses it; tokens_per_s is the aggregate rate.",
        "device": "cpu", "threads": a.threads, "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpu": cpu_name(),
        "cpus": __import__("os").cpu_count(),
        "model": {"arch": "llama", "hidden": a.hidden, "layers": a.layers, "heads": heads,
                  "kv_heads": kv_heads, "intermediate": cfg.intermediate_size,
                  "vocab": cfg.vocab_size, "tied_embeddings": bool(cfg.tie_word_embeddings),
                  "dtype": "float32"},
        "lengths": lengths, "steps": a.steps, "min_steps": a.min_steps, "warmup": a.warmup,
        "timed_steps_per_length": {str(L): steps[L] for L in lengths},
        "dense_max": a.dense_max, "min_fill": a.min_fill, "records": records,
        "wall_s": wall, "results": rows,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".txt").write_text(text + "\n")
    png = plot(result, out.with_suffix(".png"))
    print(f"\nwrote {out}, {out.with_suffix('.txt')}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
