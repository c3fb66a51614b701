"""Training throughput: unpacked vs padded batches vs packed (varlen) vs packed (dense mask).

Claim: on the same real samples, training on packs with per-sample (varlen) attention and the
chunked loss processes more real tokens per second than one sample per step or padded batches,
and the per-sample attention path beats dense SDPA with a block-diagonal mask.

Setup (all offline): Alpaca-format records made from real chitchat exchanges (the tests'
alpaca_jsonl fixture logic), the real Llama 3 tokenizer (128,256 + 1 ids) and chat template, packed by `pack-build`;
a tiny random Llama (hidden 128, 2 layers, the real 128k vocabulary). Every mode starts from the
same weights and uses the same AdamW. The loop is plain PyTorch (forward, backward, optimizer
step): it measures the model step, not DeepSpeed overhead. CPU, --threads torch threads.

Modes
  unpacked      one sample per step, HF forward with labels (full logits), sdpa attention
  padded-8      8 consecutive samples (dataset order) padded to the longest, attention mask
  packed-2k/4k/8k  one pack per step: packtrain_sdpa (per-sample SDPA over cu_seqlens) + the
                chunked loss (train.loss.packed_loss)
  packed-2k-dense  same packs, transformers' own sdpa: dense SDPA with a block-diagonal causal
                mask built from position_ids, same chunked loss

tokens/s counts real tokens only (padding excluded); steps are timed after warm-up and the
median step is reported with the aggregate rate.

    python benchmarks/train_speed.py [--steps 5] [--warmup 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
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


def write_inputs(work: Path, records: int) -> list[Path]:
    """The tests' alpaca_jsonl fixture logic: Alpaca records made from real chitchat exchanges
    (instruction = a user turn, input = the turn before it, output = the reply). Short samples
    (~100 tokens), as in instruction tuning, so padded batches stay within memory with full
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
    return [path]


def pack_dataset(tok: Path, inputs: list[Path], out: Path, max_length: int) -> Path:
    from pack.cli import build_main

    rc = build_main(["--tokenizer", str(tok), "--max-length", str(max_length),
                     *map(str, inputs), str(out)])
    if rc not in (0, None):
        raise SystemExit(f"pack-build failed ({rc})")
    return out


def samples_in_order(packed: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every sample of a packed dataset, in input (record) order."""
    from pack.format import PackedDataset

    items = []
    for p in PackedDataset(packed):
        cu = p["cu_seqlens"]
        for k, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
            items.append((int(p["sample_index"][k]), p["input_ids"][s:e].astype(np.int64),
                          p["labels"][s:e].astype(np.int64)))
    items.sort(key=lambda x: x[0])
    return [(i, l) for _, i, l in items]


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
    """Run `batches` (callables returning (loss, real_tokens)); time each full step."""
    times, tokens = [], []
    for i, make in enumerate(batches):
        t0 = time.perf_counter()
        loss, n_tokens = make(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
            tokens.append(n_tokens)
    return times, tokens


def unpacked_batches(samples, k):
    def make(ids, labels):
        def f(model):
            out = model(input_ids=torch.from_numpy(ids)[None], labels=torch.from_numpy(labels)[None],
                        use_cache=False)
            return out.loss, len(ids)
        return f
    return [make(i, l) for i, l in samples[:k]], 0


def padded_batches(samples, k, size=8):
    out, pad_total, real_total = [], 0, 0
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
        real_total += ids.numel()

        def f(model, ids=ids, lab=lab, mask=mask, real=real):
            o = model(input_ids=ids, attention_mask=mask, labels=lab, use_cache=False)
            return o.loss, real
        out.append(f)
    return out, pad_total / max(real_total, 1)


def packed_batches(packed: Path, k):
    from pack.format import PackedDataset
    from train.loss import packed_loss

    ds = PackedDataset(packed)
    out = []
    for i in range(min(k, len(ds))):
        p = ds[i]
        ids = torch.from_numpy(p["input_ids"].astype(np.int64))[None]
        lab = torch.from_numpy(p["labels"].astype(np.int64))[None]
        pos = torch.from_numpy(p["position_ids"].astype(np.int64))[None]
        cu = torch.from_numpy(p["cu_seqlens"].astype(np.int32))

        def f(model, ids=ids, lab=lab, pos=pos, cu=cu):
            loss, n = packed_loss(model, ids, lab, pos, cu, chunk_size=1024)
            return loss / max(n, 1), ids.shape[1]
        out.append(f)
    return out, 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    from pack.offline import llama3_tokenizer_dir
    from train.tiny import make_tiny_model

    n = a.steps + a.warmup
    with tempfile.TemporaryDirectory(prefix="train_speed-") as tmp:
        work = Path(tmp)
        tok = llama3_tokenizer_dir(work / "tok")
        # enough real samples for n steps of 8k-token packs
        inputs = write_inputs(work, records=130 * n)
        data = {L: pack_dataset(tok, inputs, work / f"packed-{L}", L) for L in (2048, 4096, 8192)}
        model_dir = make_tiny_model("llama", tok, work / "model", hidden=a.hidden,
                                    layers=a.layers, heads=4, kv_heads=2, seed=0)
        samples = samples_in_order(data[2048])
        modes = [
            ("unpacked (1 sample/step)", "sdpa", lambda: unpacked_batches(samples, n)),
            ("padded batches of 8", "sdpa", lambda: padded_batches(samples, n)),
            ("packed 2k, varlen", "packtrain_sdpa", lambda: packed_batches(data[2048], n)),
            ("packed 4k, varlen", "packtrain_sdpa", lambda: packed_batches(data[4096], n)),
            ("packed 8k, varlen", "packtrain_sdpa", lambda: packed_batches(data[8192], n)),
            ("packed 2k, dense SDPA + block mask", "sdpa", lambda: packed_batches(data[2048], n)),
        ]
        rows = []
        for name, attn, make in modes:
            batches, pad = make()
            model, opt = load_model(model_dir, attn)
            times, tokens = timed_steps(model, opt, batches, a.warmup)
            rates = [t / s for t, s in zip(tokens, times)]
            rows.append({"mode": name, "attention": attn, "steps": len(times),
                         "tokens_per_s": sum(tokens) / sum(times),
                         "median_tokens_per_s": statistics.median(rates),
                         "median_step_s": statistics.median(times),
                         "real_tokens_per_step": sum(tokens) / len(tokens),
                         "padding_fraction": pad})
            print(f"  {name}: {rows[-1]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr,
                  flush=True)
            del model, opt

    base = rows[0]["tokens_per_s"]
    print("\nTraining throughput on CPU (plain PyTorch loop: model step only, no DeepSpeed "
          f"overhead); {a.threads} thread(s), Llama hidden {a.hidden} x {a.layers} layers, "
          "128k vocab, fp32\n")
    print(f"{'mode':38} {'tokens/s':>10} {'median':>10} {'step s':>8} {'tok/step':>9} "
          f"{'pad':>6} {'vs unpacked':>12}")
    for r in rows:
        print(f"{r['mode']:38} {r['tokens_per_s']:>10,.0f} {r['median_tokens_per_s']:>10,.0f} "
              f"{r['median_step_s']:>8.3f} {r['real_tokens_per_step']:>9,.0f} "
              f"{r['padding_fraction']:>6.1%} {r['tokens_per_s'] / base:>11.2f}x")
    result = {
        "benchmark": "train_speed",
        "note": "plain PyTorch loop (forward+backward+AdamW step); measures the model step, not "
                "DeepSpeed overhead. tokens/s counts real tokens (no padding).",
        "device": "cpu", "threads": a.threads, "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "model": {"arch": "llama", "hidden": a.hidden, "layers": a.layers, "vocab": 128257,
                  "dtype": "float32"},
        "steps": a.steps, "warmup": a.warmup, "results": rows,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
