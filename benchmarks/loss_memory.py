"""Peak CPU memory of the loss at long packs: full logits + torch cross_entropy vs packtrain's chunked CE.

Claim: packtrain's loss (train.loss.chunked_cross_entropy) never materialises [T, V] logits, so its
memory stays flat in the pack length T, while full logits + F.cross_entropy grow as T x V (fp32 logits of
a 32k pack with a 128k vocabulary are 16 GiB, before the softmax and the gradient); and both compute the
same loss and the same gradients.

What one configuration does, in a fresh child process (so no allocator state or peak is inherited):
hidden states [T, H] and a head weight [V, H] (fp32, seeded random, requires_grad), labels with every
token a target except a -100 at each sample start (samples of --sample-len tokens: the worst case for the
chunked loss, which only computes rows that carry a label), then forward + backward of the summed loss:

  full     logits = F.linear(hidden, W) (fp32, [T, V]); F.cross_entropy(logits, shifted labels, sum);
           backward: what a Hugging Face model's own loss does for one packed row
  chunked  train.loss.chunked_cross_entropy(hidden, W, labels, chunk_size=--chunk) (sum); backward

Memory measured: the process's peak resident set (VmHWM from /proc/self/status), reset with
/proc/self/clear_refs right after the inputs are built, minus the resident set at that moment (VmRSS):
the extra memory the loss's forward + backward needed. Linux only. The child also reports its whole-process
peak (ru_maxrss) and the step's wall and CPU seconds (1 torch thread). Gradients of hidden and W are saved
by each child and compared in the parent: max abs difference of loss (per label token) and gradients.

Full logits are only run where their predicted peak (--full-factor x 4 T V bytes, calibrated against the
measured short lengths and printed) fits under --mem-limit-gib (default: half the memory available at
start, the machine being shared); longer ones are listed as not run, with the prediction.

Outputs: benchmarks/results/loss_memory.{json,png} (--out to change).

    python benchmarks/loss_memory.py [--lengths 2048,...,32768] [--vocab 128256] [--hidden 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_name, proc_status, pyplot  # noqa: E402  (also puts the repo on sys.path)

ROOT = Path(__file__).resolve().parent.parent

RESULTS = ROOT / "benchmarks" / "results" / "loss_memory.json"
GIB = 2**30


def _status(key: str) -> int:
    value = proc_status(key)
    if value is None:
        raise OSError(f"/proc/self/status has no {key}")
    return value


def mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def child(method: str, length: int, vocab: int, hidden: int, chunk: int, sample_len: int, out_dir: Path) -> dict:
    """One configuration, in this (fresh) process: build inputs, reset the peak, forward + backward."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from train.loss import chunked_cross_entropy, shift_labels

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(length, hidden, generator=g) * 1.0).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * hidden ** -0.5).requires_grad_(True)
    labels = torch.randint(0, vocab, (length,), generator=g)
    labels[::sample_len] = -100  # a sample start is never a target (as in packtrain's packs)
    cu = torch.arange(0, length + 1, sample_len)
    if int(cu[-1]) != length:
        cu = torch.cat([cu, torch.tensor([length])])
    n_targets = int((shift_labels(labels, cu) != -100).sum())
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0, c0 = time.perf_counter(), time.process_time()
    if method == "full":
        logits = F.linear(h, w).float()
        loss = F.cross_entropy(logits, shift_labels(labels, cu), ignore_index=-100, reduction="sum")
        del logits
    else:
        loss, n = chunked_cross_entropy(h, w, labels, chunk_size=chunk, cu_seqlens=cu)
        assert n == n_targets, (n, n_targets)
    loss.backward()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _status("VmHWM")
    np.save(out_dir / f"{method}-{length}-grad_h.npy", h.grad.numpy())
    np.save(out_dir / f"{method}-{length}-grad_w.npy", w.grad.numpy())
    return {"method": method, "length": length, "vocab": vocab, "hidden": hidden, "label_tokens": n_targets,
            "loss_sum": float(loss), "loss_per_token": float(loss) / max(n_targets, 1),
            "rss_before_mb": base / 2**20, "peak_rss_mb": peak / 2**20, "extra_peak_mb": (peak - base) / 2**20,
            "process_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "wall_s": wall, "cpu_s": cpu}


def run_child(method: str, length: int, a, out_dir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--lengths", str(length),
           "--vocab", str(a.vocab), "--hidden", str(a.hidden), "--chunk", str(a.chunk),
           "--sample-len", str(a.sample_len), "--work", str(out_dir)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"loss_memory: {method} at {length} failed (exit {p.returncode}): {tail[0]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def compare(out_dir: Path, length: int) -> dict:
    import numpy as np

    d = {}
    for name in ("grad_h", "grad_w"):
        f = np.load(out_dir / f"full-{length}-{name}.npy")
        c = np.load(out_dir / f"chunked-{length}-{name}.npy")
        d[f"max_abs_diff_{name}"] = float(np.abs(f - c).max())
        d[f"max_abs_{name}"] = float(np.abs(f).max())
    return d


def plot(result: dict, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    xs = [r["length"] for r in rows]
    ax.plot(xs, [r["chunked"]["extra_peak_mb"] / 1024 for r in rows], "o-", color="#2a6fbb",
            label=f"packtrain chunked CE (chunk {result['chunk']})")
    meas = [r for r in rows if r.get("full")]
    ax.plot([r["length"] for r in meas], [r["full"]["extra_peak_mb"] / 1024 for r in meas], "s-", color="#c0392b",
            label="full logits + F.cross_entropy (measured)")
    pred = [r for r in rows if not r.get("full")]
    if pred:
        last = meas[-1:] if meas else []
        ax.plot([r["length"] for r in last + pred],
                [r["full"]["extra_peak_mb"] / 1024 for r in last] + [r["full_predicted_gib"] for r in pred],
                "s--", color="#c0392b", mfc="none", label="full logits (predicted, not run: too big here)")
    for r in rows:
        ax.annotate(f"{r['chunked']['extra_peak_mb'] / 1024:.2f}", (r["length"], r["chunked"]["extra_peak_mb"] / 1024),
                    textcoords="offset points", xytext=(0, -12), ha="center", fontsize=7, color="#2a6fbb")
        v = r["full"]["extra_peak_mb"] / 1024 if r.get("full") else r["full_predicted_gib"]
        ax.annotate(f"{v:.1f}", (r["length"], v), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=7, color="#c0392b")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{x // 1024}k" if x % 1024 == 0 else str(x) for x in xs])
    ax.set_xlabel("pack length T (tokens)")
    ax.set_ylabel("peak extra RSS of loss fwd+bwd (GiB)")
    ax.set_title(f"CPU loss memory, vocab {result['vocab']:,}, hidden {result['hidden']}, fp32\n"
                 f"{result['cpu']}, torch {result['torch']}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    ap.add_argument("--vocab", type=int, default=128256, help="vocabulary size (Llama 3: 128,256; Qwen: 151,936)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=1024, help="chunk size of the chunked loss (label tokens)")
    ap.add_argument("--sample-len", type=int, default=512, help="tokens per sample inside a pack")
    ap.add_argument("--mem-limit-gib", type=float, default=None,
                    help="run full logits only where the predicted peak fits (default: half of MemAvailable)")
    ap.add_argument("--full-factor", type=float, default=3.0,
                    help="predicted full-logits peak = this x 4 T V bytes until a measurement calibrates it")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", choices=("full", "chunked"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    try:
        lengths = sorted({int(x) for x in a.lengths.split(",") if x.strip()})
    except ValueError:
        ap.error("--lengths: comma-separated integers")
    if not lengths or min(lengths) < 2 or a.vocab < 2 or a.hidden < 1 or a.chunk < 1 or a.sample_len < 2:
        ap.error("lengths >= 2, --vocab >= 2, --hidden/--chunk >= 1, --sample-len >= 2")
    if a.child:
        print(json.dumps(child(a.child, lengths[0], a.vocab, a.hidden, a.chunk, a.sample_len, Path(a.work))))
        return 0
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("loss_memory: needs Linux /proc (VmHWM and clear_refs) to measure peak memory")
    import torch

    avail = mem_available()
    limit = a.mem_limit_gib * GIB if a.mem_limit_gib else (avail or 8 * GIB) / 2
    factor = a.full_factor
    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="loss_memory-") as tmp:
        work = Path(tmp)
        for T in lengths:
            logits_bytes = 4 * T * a.vocab
            row = {"length": T, "logits_fp32_gib": logits_bytes / GIB}
            row["chunked"] = run_child("chunked", T, a, work)
            predicted = factor * logits_bytes
            if predicted <= limit:
                row["full"] = run_child("full", T, a, work)
                factor = max(factor, row["full"]["extra_peak_mb"] * 2**20 / logits_bytes)  # calibrate upward
                row.update(compare(work, T))
                row["max_abs_diff_loss_per_token"] = abs(row["full"]["loss_per_token"] - row["chunked"]["loss_per_token"])
                row["memory_ratio"] = row["full"]["extra_peak_mb"] / row["chunked"]["extra_peak_mb"]
            else:
                row["full"] = None
                row["full_predicted_gib"] = predicted / GIB
                row["full_skipped"] = (f"predicted peak {predicted / GIB:.1f} GiB ({factor:.2f} x the {logits_bytes / GIB:.1f}"
                                       f" GiB fp32 logits) > limit {limit / GIB:.1f} GiB")
            for f in (work / f"full-{T}-grad_h.npy", work / f"full-{T}-grad_w.npy",
                      work / f"chunked-{T}-grad_h.npy", work / f"chunked-{T}-grad_w.npy"):
                f.unlink(missing_ok=True)
            rows.append(row)
            c, f = row["chunked"], row["full"]
            print(f"  T={T}: chunked {c['extra_peak_mb']:,.0f} MB {c['wall_s']:.1f}s; full "
                  + (f"{f['extra_peak_mb']:,.0f} MB {f['wall_s']:.1f}s" if f else row["full_skipped"]),
                  file=sys.stderr, flush=True)
    lines = [f"Loss forward + backward on CPU, fp32, vocab {a.vocab:,}, hidden {a.hidden}, chunk {a.chunk}, "
             f"samples of {a.sample_len} tokens, every token a label; 1 thread; {cpu_name()}",
             "",
             f"{'T':>6} {'fp32 logits':>11} {'full: peak extra':>16} {'chunked: peak extra':>19} {'ratio':>6} "
             f"{'full CPU-s':>10} {'chunked CPU-s':>13} {'|d loss/token|':>14} {'|d grad_h|':>10} {'|d grad_W|':>10}"]
    lines.append("-" * len(lines[-1]))
    for r in rows:
        c, f = r["chunked"], r["full"]
        full_mem = f"{f['extra_peak_mb'] / 1024:,.2f} GiB" if f else f"~{r['full_predicted_gib']:.1f} GiB*"
        lines.append(f"{r['length']:>6} {r['logits_fp32_gib']:>7.2f} GiB {full_mem:>16} "
                     f"{c['extra_peak_mb'] / 1024:>15.3f} GiB "
                     + (f"{r['memory_ratio']:>5.1f}x {f['cpu_s']:>10.1f} {c['cpu_s']:>13.1f} "
                        f"{r['max_abs_diff_loss_per_token']:>14.2e} {r['max_abs_diff_grad_h']:>10.2e} "
                        f"{r['max_abs_diff_grad_w']:>10.2e}" if f else
                        f"{'-':>6} {'-':>10} {c['cpu_s']:>13.1f} {'-':>14} {'-':>10} {'-':>10}"))
    if any(r["full"] is None for r in rows):
        lines.append(f"* not run: predicted ({factor:.2f} x fp32 logits, calibrated on the measured lengths) above the "
                     f"{limit / GIB:.1f} GiB limit on this shared machine")
    lines.append("peak extra = VmHWM - VmRSS around forward + backward, in a fresh process per configuration, "
                 "measured after the inputs are built (the [V, H] weight gradient falls inside the window for both); "
                 "CPU-s: process CPU seconds of forward + backward, 1 thread")
    text = "\n".join(lines)
    print(text)
    result = {"benchmark": "loss_memory", "vocab": a.vocab, "hidden": a.hidden, "chunk": a.chunk,
              "sample_len": a.sample_len, "dtype": "float32", "threads": 1, "torch": torch.__version__,
              "python": platform.python_version(), "cpu": cpu_name(), "cpus": os.cpu_count(),
              "mem_available_gib": avail / GIB if avail else None, "mem_limit_gib": limit / GIB,
              "full_factor": factor, "measure": "VmHWM minus VmRSS in a fresh child process per configuration, "
              "peak reset via /proc/self/clear_refs after building the inputs",
              "wall_s": time.perf_counter() - t_start, "rows": rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmpf = out.with_suffix(".json.tmp")
    tmpf.write_text(json.dumps(result, indent=2) + "\n")
    tmpf.replace(out)
    png = plot(result, out.with_suffix(".png"))
    print(f"\nwrote {out}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
