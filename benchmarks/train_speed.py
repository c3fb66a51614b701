"""Training throughput on CPU: packtrain's packed varlen step side by side with the tools people use.

Claim: on the same real samples, the same model and the same tokenizer, training on packtrain's packs
with per-sample (varlen) attention and the chunked loss processes more tokens per second than one
sample per step, padded batches, Hugging Face `Trainer` with `DataCollatorWithFlattening`
(padding-free) and TRL's `SFTTrainer(packing=True)`, at every pack length from 2k to 32k.

Setup (all offline): Alpaca-format records made from real chitchat exchanges (the tests' alpaca_jsonl
fixture logic), the real Llama 3 tokenizer (128,256 + 1 ids) and chat template, packed by `pack-build`
once per --lengths value; random-weight models of a real layout (--size):

  small  Llama layout, hidden 128 x 2 layers, 4/2 heads, intermediate 512 (~33M parameters, nearly
         all in the 128k-vocabulary embedding and head)
  70m    Qwen3 layout, hidden 256 x 4 layers, 4/2 heads, intermediate 1024 (~70M parameters)

fp32, CPU, --threads torch threads. Every row starts from the same weights.

Same samples: one pool of records is packed at every length; the first full packs (fill >=
--min-fill) in the dataset's pack order are used. Every row that does not take packtrain's packs
trains on the samples of the shortest length's full packs, in pack order (TRL packs them itself).

Rows (each one a separate model + optimizer; tokens = every real input token the step trains on,
prompt tokens included, padding excluded: the same definition for every row)
  plain loop (forward, backward, torch.optim.AdamW step; measures the model step):
    unpacked          one sample per step, HF forward with labels (full logits), sdpa attention
    padded x8         8 consecutive samples padded to the longest, attention mask
    packed <L>        packtrain: one pack per step, packtrain_sdpa (per-sample SDPA over cu_seqlens)
                      + chunked loss (train.loss.packed_loss), for every L in --lengths
    packed <L> dense  same packs, transformers' own sdpa: dense SDPA with a block-diagonal causal mask
                      built from position_ids, same chunked loss; only L <= --dense-max (quadratic mask)
    packed <L>, --compile  (with --compile-rows) the packed row with train-run --compile's compiled
                      decoder layers (train.compile; compiled during the warm-up step)
  peers, run through their own trainers (Trainer.train() with max_steps; defaults kept except
  lr 1e-4, weight decay 0, no saving/logging/reporting, CPU, 0 dataloader workers):
    HF 1/step         transformers Trainer, batch 1 (XTuner's unpacked baseline as a Trainer user runs it)
    HF padded x8      Trainer, batch 8, DataCollatorForSeq2Seq (pads with -100 labels)
    HF flattening     Trainer + DataCollatorWithFlattening (padding-free: input_ids, labels,
                      position_ids; no cu_seq_lens/seq_idx by default), batch = the mean number of
                      samples per shortest-length pack, so a step holds about as many tokens as
                      packtrain's shortest pack. attn_implementation "sdpa": on CPU transformers
                      detects the packing from position_ids and runs dense SDPA with a block mask
                      (flash_attention_2/3 need CUDA; flex_attention has no CPU backward). This
                      needs config.use_cache False, which Trainer sets (TrainingArguments.use_cache
                      defaults to False): with True, packing is not detected and samples attend to
                      each other (max logit difference 0.27 on a 2-layer Llama, see FACTS.md).
    TRL packing <L>   trl SFTTrainer(packing=True, max_length=L) for L in --trl-lengths, batch 1,
                      TRL's defaults: packing_strategy "bfd" (which turns on padding_free), its
                      fused chunked LM head for the loss, transformers' sdpa attention (dense block
                      mask, as above). Given the samples pre-tokenized (input_ids + labels).
  Sequential order for the Trainer rows (a SequentialSampler: the same samples as the plain loop);
  TRL keeps its own (random) sampler over its packs.

Timing: each row runs --warmup untimed steps, then a fixed number of timed steps: enough to cover
about --timed-tokens tokens (at least --min-steps, at most --max-steps). Longer packtrain packs warm
up on one pack of the shortest length (same code path; the optimizer state and lazy initialisation
are what warm-up is for, and a 32k warm-up step of the 70M model costs minutes). Trainer rows are
timed by a callback between consecutive on_step_end calls, so their data loading and collation count,
as the plain loop's batches are prepared before timing (both negligible next to the step). Rows run
round-robin --rounds times so that load from other processes hits all alike (inside a round, the rows
the claims rest on run first: unpacked, flattening, packtrain, TRL, then the rest). Reported: the
median over rounds of each round's CPU rate (tokens / process CPU seconds of its timed steps,
time.process_time, 1 torch thread: on a shared machine the wall rate mostly measures the share of a
core the process got) and of its wall rate. The text table, the ratios in it and the chart use CPU
rates; the JSON has both. Peak RSS per row: VmHWM after resetting it (/proc/self/clear_refs) before
the row's model is loaded. Results are rewritten after every row ("complete": false until the end).

Outputs: benchmarks/results/train_speed.{json,txt,png} (--out to change); --combine merges the JSON
of runs made separately (e.g. one process per --size) into one.

    python benchmarks/train_speed.py [--size small|70m|both] [--lengths 2048,...,32768] [--rounds 2]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
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
from _common import cpu_name, proc_status, pyplot  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "train_speed.json"
TOKENS_PER_RECORD_GUESS = 80  # low guess (they average ~90 with the chat template): more records, not fewer

SIZES = {
    "small": dict(arch="llama", hidden=128, layers=2, heads=4, kv_heads=2, intermediate=512),
    "70m": dict(arch="qwen3", hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024),
    "tiny": dict(arch="llama", hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64),  # smoke tests only
}
KINDS = ("unpacked", "padded", "hf_one", "hf_padded", "hf_flat", "trl", "varlen", "dense", "compiled")


# ------------------------------------------------------------------ data

def write_inputs(work: Path, records: int) -> list[Path]:
    """The tests' alpaca_jsonl fixture logic: Alpaca records made from real chitchat exchanges
    (instruction = a user turn, input = the turn before it, output = the reply). Short samples
    (~90 tokens), as in instruction tuning."""
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


# ------------------------------------------------------------------ plain-loop rows

def load_model(model_dir: Path, attn: str, compiled: bool = False):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                             attn_implementation="sdpa")
    m.config.use_cache = False  # a cache hides the packing from transformers' mask (FACTS.md)
    if attn == "packtrain_sdpa":
        from train.attention import enable_packed_attention

        enable_packed_attention(m, "sdpa")
    if compiled:  # train-run --compile: the decoder layers, the attention as a custom op
        from train.compile import compile_decoder_layers

        compile_decoder_layers(m, attn)
    m.train()
    return m


def unpacked_batches(samples, k):
    if len(samples) < k:
        raise SystemExit(f"unpacked: {len(samples)} samples, {k} needed")

    def make(ids, labels):
        def f(model):
            out = model(input_ids=torch.from_numpy(ids)[None], labels=torch.from_numpy(labels)[None],
                        use_cache=False)
            return out.loss, len(ids)
        return f
    return [make(i, l) for i, l in samples[:k]]


def padded_batches(samples, k, size=8):
    if len(samples) < k * size:
        raise SystemExit(f"padded: {len(samples)} samples, {k * size} needed")
    out = []
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

        def f(model, ids=ids, lab=lab, mask=mask, real=real):
            o = model(input_ids=ids, attention_mask=mask, labels=lab, use_cache=False)
            return o.loss, real
        out.append(f)
    return out


def packed_batches(packed: Path, packs: list[int]):
    from pack.format import PackedDataset
    from train.loss import packed_loss

    ds = PackedDataset(packed)
    out = []
    for i in packs:
        p = ds[i]
        ids = torch.from_numpy(p["input_ids"].astype(np.int64))[None]
        lab = torch.from_numpy(p["labels"].astype(np.int64))[None]
        pos = torch.from_numpy(p["position_ids"].astype(np.int64))[None]
        cu = torch.from_numpy(p["cu_seqlens"].astype(np.int32))

        def f(model, ids=ids, lab=lab, pos=pos, cu=cu):
            loss, n = packed_loss(model, ids, lab, pos, cu, chunk_size=1024)
            return loss / max(n, 1), ids.shape[1]
        out.append(f)
    return out


def run_plain(model_dir: Path, attn: str, warm: list, timed: list,
              compiled: bool = False) -> list[tuple[float, float, int]]:
    """Warm-up steps, then timed steps (wall, process CPU, tokens) of the plain loop (compiling
    happens in the warm-up steps)."""
    model = load_model(model_dir, attn, compiled)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    out = []
    for i, make in enumerate(warm + timed):
        t0, c0 = time.perf_counter(), time.process_time()
        loss, n_tokens = make(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= len(warm):
            out.append((time.perf_counter() - t0, time.process_time() - c0, n_tokens))
    del model, opt
    return out


# ------------------------------------------------------------------ peer rows (Trainer, TRL)

def _trainer_args(cls, work: Path, steps: int, batch: int, **extra):
    return cls(output_dir=str(work / "hf-out"), max_steps=steps, per_device_train_batch_size=batch,
               learning_rate=1e-4, weight_decay=0.0, save_strategy="no", report_to="none",
               logging_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
               seed=0, **extra)


class _Counting:
    """Wraps a collator to record the real (non-padding) tokens of every batch it makes, in order."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, []

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        self.tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch


def _step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Marks (wall, CPU) at train begin and after every optimizer step."""

        def __init__(self):
            self.marks = []

        def on_train_begin(self, args, state, control, **kw):
            self.marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kw):
            self.marks.append((time.perf_counter(), time.process_time()))

    return StepClock()


def _sequential(trainer_cls):
    """The same Trainer, iterating the dataset in order (the plain loop's samples, in the same order)."""
    from torch.utils.data import SequentialSampler

    class Sequential(trainer_cls):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    return Sequential


def run_trainer(kind: str, model_dir: Path, tok_dir: Path, work: Path, samples, warmup: int,
                steps: int, batch: int, max_length: int | None = None) -> list[tuple[float, float, int]]:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainingArguments

    from pack.tokenize.loading import load_tokenizer

    tok = load_tokenizer(tok_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # padding only; the labels of padding are -100
    ds = Dataset.from_dict({"input_ids": [i.tolist() for i, _ in samples],
                            "labels": [l.tolist() for _, l in samples]})
    model = load_model(model_dir, "sdpa")
    clock = _step_clock()
    total = warmup + steps
    if kind == "trl":
        from trl import SFTConfig, SFTTrainer

        # fp32 and no activation checkpointing, like every other row: TRL's own defaults (bf16 autocast,
        # gradient_checkpointing=True) would change the model's numerics and add a recompute pass
        args = _trainer_args(SFTConfig, work, total, 1, packing=True, max_length=max_length,
                             bf16=False, gradient_checkpointing=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                             callbacks=[clock])
    else:
        if kind == "hf_flat":
            collator = DataCollatorWithFlattening()
        else:
            collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
        trainer = _sequential(Trainer)(model=model, args=_trainer_args(TrainingArguments, work, total, batch),
                                       train_dataset=ds, data_collator=collator, callbacks=[clock])
    counting = _Counting(trainer.data_collator)
    trainer.data_collator = counting  # read by get_train_dataloader at train() time
    trainer.train()
    marks = clock.marks
    if len(marks) != total + 1 or len(counting.tokens) < total:
        raise SystemExit(f"{kind}: expected {total} steps, timed {len(marks) - 1}, "
                         f"collated {len(counting.tokens)} batches")
    out = [(marks[i + 1][0] - marks[i][0], marks[i + 1][1] - marks[i][1], counting.tokens[i])
           for i in range(warmup, total)]
    del trainer, model
    return out


# ------------------------------------------------------------------ measurement helpers

def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def short(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _steps_for(tokens_per_step: float, a, timed_tokens: int) -> int:
    return int(min(a.max_steps, max(a.min_steps, round(timed_tokens / max(tokens_per_step, 1)))))


# ------------------------------------------------------------------ one model size

def run_size(size: str, a, lengths: list[int], trl_lengths: list[int], work: Path, tok: Path,
             data: dict, chosen_all: dict, samples, progress=None) -> dict:
    from transformers import AutoConfig

    from train.tiny import make_tiny_model

    spec = SIZES[size]
    model_dir = make_tiny_model(spec["arch"], tok, work / f"model-{size}", hidden=spec["hidden"],
                                layers=spec["layers"], heads=spec["heads"], kv_heads=spec["kv_heads"],
                                intermediate=spec["intermediate"], seed=0)
    cfg = AutoConfig.from_pretrained(str(model_dir))
    from transformers import AutoModelForCausalLM

    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    l0 = lengths[0]
    mean_len = float(np.mean([len(i) for i, _ in samples]))
    from pack.format import PackedDataset

    ds0 = PackedDataset(data[l0])
    samples_per_l0_pack = float(np.mean([len(ds0[i]["cu_seqlens"]) - 1 for i in chosen_all[l0]]))
    flat_batch = max(1, round(samples_per_l0_pack))
    del ds0

    timed = a.timed_tokens_70m if size == "70m" else a.timed_tokens
    rows = []  # (label, kind, L, tokens_per_step, runner)
    n = _steps_for(mean_len, a, timed)
    rows.append(("unpacked (1 sample/step), plain loop", "unpacked", None, mean_len,
                 lambda n=n: run_plain(model_dir, "sdpa", *_split(unpacked_batches(samples, a.warmup + n), a.warmup))))
    n8 = _steps_for(8 * mean_len, a, timed)
    rows.append(("padded batches of 8, plain loop", "padded", None, 8 * mean_len,
                 lambda n=n8: run_plain(model_dir, "sdpa", *_split(padded_batches(samples, a.warmup + n), a.warmup))))
    if not a.no_peers:
        rows.append(("HF Trainer, 1 sample/step", "hf_one", None, mean_len,
                     lambda n=n: run_trainer("hf_one", model_dir, tok, work, samples, a.warmup, n, 1)))
        rows.append(("HF Trainer, padded batches of 8", "hf_padded", None, 8 * mean_len,
                     lambda n=n8: run_trainer("hf_padded", model_dir, tok, work, samples, a.warmup, n, 8)))
        nf = _steps_for(flat_batch * mean_len, a, timed)
        rows.append((f"HF Trainer + DataCollatorWithFlattening (batch {flat_batch})", "hf_flat", None,
                     flat_batch * mean_len,
                     lambda n=nf: run_trainer("hf_flat", model_dir, tok, work, samples, a.warmup, n, flat_batch)))
        if trl_lengths and importlib.util.find_spec("trl") is None:
            print("  trl is not installed (pip install --no-deps trl): TRL rows skipped", file=sys.stderr)
        for L in (trl_lengths if importlib.util.find_spec("trl") is not None else []):
            nt = _steps_for(L * 0.97, a, timed)
            rows.append((f"TRL SFTTrainer packing {short(L)} (bfd, sdpa)", "trl", L, L * 0.97,
                         lambda n=nt, L=L: run_trainer("trl", model_dir, tok, work, samples, a.warmup, n, 1, L)))
    for L in lengths:
        nl = _steps_for(L, a, timed)
        warm = (lambda: packed_batches(data[l0], chosen_all[l0][:a.warmup])) if L != l0 else None

        def runner(L=L, nl=nl, warm=warm, attn="packtrain_sdpa", compiled=False):
            if warm is None:
                w, t = _split(packed_batches(data[L], chosen_all[L][:a.warmup + nl]), a.warmup)
            else:
                w, t = warm(), packed_batches(data[L], chosen_all[L][:nl])
            return run_plain(model_dir, attn, w, t, compiled)

        rows.append((f"packtrain packed {short(L)}, varlen", "varlen", L, L, runner))
        if a.compile_rows:
            rows.append((f"packtrain packed {short(L)}, varlen, --compile", "compiled", L, L,
                         lambda runner=runner: runner(compiled=True)))
        if L <= a.dense_max:
            rows.append((f"packed {short(L)}, dense SDPA + block mask", "dense", L, L,
                         lambda runner=runner: runner(attn="sdpa")))

    # run order inside a round: the rows the claims rest on first, so that a run cut short (results are
    # written after every row) still holds them
    prio = {"unpacked": 0, "hf_flat": 1, "varlen": 2, "compiled": 2, "trl": 3, "dense": 4, "padded": 5,
            "hf_one": 6, "hf_padded": 7}
    run_order = sorted(rows, key=lambda row: (prio[row[1]], row[2] or 0))
    results = {label: {"mode": label, "kind": kind, "max_length": L, "rounds": []}
               for label, kind, L, _, _ in rows}
    meta = {"size": size, "model": {**spec, "vocab": cfg.vocab_size, "parameters": n_params,
                                    "tied_embeddings": bool(cfg.tie_word_embeddings), "dtype": "float32"},
            "hf_flat_batch": flat_batch, "mean_sample_tokens": mean_len}
    table_order = [row[0] for row in rows]
    for r in range(a.rounds):
        for label, kind, L, tps, runner in run_order:
            gc.collect()
            rss_before = proc_status("VmRSS")
            peak_ok = reset_peak_rss()
            t_row = time.perf_counter()
            steps = runner()
            peak = proc_status("VmHWM") if peak_ok else None
            wall = sum(s[0] for s in steps)
            cpu = sum(s[1] for s in steps)
            tokens = sum(s[2] for s in steps)
            rnd = {"steps": len(steps), "step_s": [s[0] for s in steps], "step_cpu_s": [s[1] for s in steps],
                   "step_tokens": [s[2] for s in steps], "tokens_per_s": tokens / wall,
                   "tokens_per_cpu_s": tokens / cpu, "row_wall_s": time.perf_counter() - t_row,
                   "rss_before_mb": rss_before / 2**20 if rss_before else None,
                   "peak_rss_mb": peak / 2**20 if peak else None}
            results[label]["rounds"].append(rnd)
            print(f"  [{size} round {r + 1}/{a.rounds}] {label}: {rnd['tokens_per_s']:,.0f} tok/s, "
                  f"{rnd['tokens_per_cpu_s']:,.0f} tok/CPU-s, {len(steps)} steps, "
                  f"{rnd['row_wall_s']:.0f}s", file=sys.stderr, flush=True)
            gc.collect()
            if progress is not None:
                progress(summarize(meta, [results[x] for x in table_order], complete=False))
    return summarize(meta, [results[x] for x in table_order], complete=True)


def summarize(meta: dict, rows: list[dict], complete: bool) -> dict:
    """Medians over the rounds each row has run, ratios between rows, and the targets' checks."""
    out_rows = []
    for row in rows:
        rs = row["rounds"]
        if not rs:
            continue
        row = dict(row)
        row.update(rounds_run=len(rs), steps=rs[0]["steps"],
                   tokens_per_step=statistics.mean(t for x in rs for t in x["step_tokens"]),
                   tokens_per_s=statistics.median(x["tokens_per_s"] for x in rs),
                   tokens_per_cpu_s=statistics.median(x["tokens_per_cpu_s"] for x in rs),
                   median_step_s=statistics.median(s for x in rs for s in x["step_s"]),
                   peak_rss_mb=max((x["peak_rss_mb"] or 0) for x in rs) or None)
        out_rows.append(row)
    by_kind = lambda k: [r for r in out_rows if r["kind"] == k]  # noqa: E731
    base = by_kind("unpacked")
    flat = by_kind("hf_flat")
    trl = {r["max_length"]: r for r in by_kind("trl")}
    for r in out_rows:
        if base:
            r["x_unpacked"] = r["tokens_per_s"] / base[0]["tokens_per_s"]
            r["x_unpacked_cpu"] = r["tokens_per_cpu_s"] / base[0]["tokens_per_cpu_s"]
        if flat:
            r["x_hf_flat"] = r["tokens_per_s"] / flat[0]["tokens_per_s"]
            r["x_hf_flat_cpu"] = r["tokens_per_cpu_s"] / flat[0]["tokens_per_cpu_s"]
        if r["kind"] == "varlen" and trl:
            # packtrain at L against TRL at the same L, else TRL's best row (its best case)
            t = trl.get(r["max_length"]) or max(trl.values(), key=lambda x: x["tokens_per_cpu_s"])
            r["vs_trl"] = t["mode"]
            r["x_trl"] = r["tokens_per_s"] / t["tokens_per_s"]
            r["x_trl_cpu"] = r["tokens_per_cpu_s"] / t["tokens_per_cpu_s"]
    varlen = {r["max_length"]: r for r in by_kind("varlen")}
    checks = {}
    if varlen:
        lo, hi = varlen[min(varlen)], varlen[max(varlen)]
        checks["longest_vs_shortest"] = hi["tokens_per_s"] / lo["tokens_per_s"]
        checks["longest_vs_shortest_cpu"] = hi["tokens_per_cpu_s"] / lo["tokens_per_cpu_s"]
        if flat:
            checks["min_x_hf_flat"] = min(r["x_hf_flat"] for r in varlen.values())
            checks["min_x_hf_flat_cpu"] = min(r["x_hf_flat_cpu"] for r in varlen.values())
        if trl:
            checks["min_x_trl"] = min(r["x_trl"] for r in varlen.values())
            checks["min_x_trl_cpu"] = min(r["x_trl_cpu"] for r in varlen.values())
    return {**meta, "complete": complete, "rows": out_rows, "checks": checks}


def _split(batches: list, warmup: int) -> tuple[list, list]:
    return batches[:warmup], batches[warmup:]


# ------------------------------------------------------------------ report

def render(result: dict) -> str:
    lines = []
    for s in result["sizes"]:
        m = s["model"]
        lines.append(f"\n== {s['size']}: {m['arch']} hidden {m['hidden']} x {m['layers']} layers, "
                     f"intermediate {m['intermediate']}, vocab {m['vocab']:,}, {m['parameters'] / 1e6:.1f}M "
                     f"parameters, fp32, {result['threads']} thread(s)")
        if not s.get("complete", True):
            lines.append("(partial: the run was cut short; rows and rounds below are those it finished)")
        cols = (f"{'row':58} {'rnds':>4} {'steps':>5} {'tok/step':>8} {'tok/CPU-s':>9} {'x unpk':>6} {'x flat':>6} "
                f"{'x TRL':>6} {'tok/s wall':>10} {'peak RSS':>9}")
        lines += [cols, "-" * len(cols)]
        for r in s["rows"]:
            f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "-"  # noqa: E731
            rss = f"{r['peak_rss_mb']:,.0f} MB" if r.get("peak_rss_mb") else "-"
            lines.append(f"{r['mode']:58} {r.get('rounds_run', 1):>4} {r['steps']:>5} {r['tokens_per_step']:>8,.0f} "
                         f"{r['tokens_per_cpu_s']:>9,.0f} {f('x_unpacked_cpu', '.2f'):>6} "
                         f"{f('x_hf_flat_cpu', '.2f'):>6} {f('x_trl_cpu', '.2f'):>6} {r['tokens_per_s']:>10,.0f} "
                         f"{rss:>9}")
        c = s["checks"]
        lines.append("targets (reported, not asserted): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in c.items()))
    lines.append("\ntok/CPU-s: median over rounds of (timed tokens / process CPU seconds of the timed steps), "
                 "1 torch thread; tokens = real input tokens incl. prompt, no padding; x unpk / x flat / x TRL: "
                 "CPU-rate ratios to the plain-loop unpacked row / HF Trainer + DataCollatorWithFlattening / TRL "
                 "packing at the same length (else TRL's best length); tok/s wall: the same with wall seconds "
                 "(on a shared machine it mostly measures the share of a core this process got)")
    lines.append(f"machine: {result['cpu']} ({result['cpus']} cores, shared), torch {result['torch']}, "
                 f"transformers {result['transformers']}, trl {result['trl']}; total run time "
                 f"{result['wall_s']:.0f}s")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None

    sizes = result["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(7.0 * len(sizes), 5.4), squeeze=False)
    style = {"varlen": ("#2a6fbb", "o", "packtrain packed, per-sample SDPA + chunked CE"),
             "dense": ("#c0392b", "s", "packed, transformers dense SDPA + block mask"),
             "trl": ("#8e44ad", "^", "TRL SFTTrainer packing=True (bfd)")}
    flat_style = {"hf_flat": ("#27ae60", "-", "HF Trainer + DataCollatorWithFlattening"),
                  "hf_one": ("#7f8c8d", ":", "HF Trainer, 1 sample/step"),
                  "hf_padded": ("#e67e22", ":", "HF Trainer, padded x8"),
                  "unpacked": ("#34495e", "--", "plain loop, 1 sample/step (unpacked)"),
                  "padded": ("#f0a030", "--", "plain loop, padded x8")}
    for ax, s in zip(axes[0], sizes):
        lengths = sorted({r["max_length"] for r in s["rows"] if r["kind"] == "varlen"})
        for kind, (color, marker, label) in style.items():
            rs = sorted((r for r in s["rows"] if r["kind"] == kind), key=lambda r: r["max_length"])
            if rs:
                ax.plot([r["max_length"] for r in rs], [r["tokens_per_cpu_s"] for r in rs], marker=marker,
                        color=color, label=label, lw=2)
                for r in rs:
                    ax.annotate(f"{r['tokens_per_cpu_s']:,.0f}", (r["max_length"], r["tokens_per_cpu_s"]),
                                textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7, color=color)
        for kind, (color, ls, label) in flat_style.items():
            rs = [r for r in s["rows"] if r["kind"] == kind]
            if rs:
                y = rs[0]["tokens_per_cpu_s"]
                ax.axhline(y, color=color, ls=ls, lw=1.5, label=f"{label}: {y:,.0f}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [short(L) for L in lengths])
        ax.set_xlabel("pack length (tokens)")
        ax.set_ylabel("tokens per CPU-second (1 thread; median of rounds)")
        ax.set_ylim(0, None)
        m = s["model"]
        ax.set_title(f"{s['size']}: {m['arch']} hidden {m['hidden']} x {m['layers']}, vocab {m['vocab']:,}, "
                     f"{m['parameters'] / 1e6:.0f}M params, fp32", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    fig.suptitle(f"CPU training throughput, {result['threads']} thread(s), same samples/model/tokenizer; "
                 f"{result['cpu']} ({result['cpus']} cores, shared)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="both", choices=("small", "70m", "both", "tiny"))
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768",
                    help="packtrain pack lengths, comma-separated")
    ap.add_argument("--trl-lengths", default="2048,4096", help="TRL packing lengths, comma-separated")
    ap.add_argument("--no-peers", action="store_true", help="skip the Trainer and TRL rows")
    ap.add_argument("--compile-rows", action="store_true",
                    help="also packtrain's packed rows with train-run --compile's compiled layers")
    ap.add_argument("--rounds", type=int, default=2, help="round-robin repeats of every row")
    ap.add_argument("--timed-tokens", type=int, default=8192,
                    help="timed tokens per row and round, small model (steps rounded, within --min/--max-steps)")
    ap.add_argument("--timed-tokens-70m", type=int, default=4096,
                    help="timed tokens per row and round, 70m model")
    ap.add_argument("--min-steps", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dense-max", type=int, default=4096,
                    help="dense SDPA + block mask rows only for pack lengths up to this")
    ap.add_argument("--min-fill", type=float, default=0.95,
                    help="a pack counts as full when it holds this fraction of max_length")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--combine", nargs="+", metavar="JSON",
                    help="only merge the JSON results of earlier runs (one per --size) into --out")
    a = ap.parse_args(argv)
    if a.combine:
        return combine(a.combine, Path(a.out))
    try:
        lengths = sorted({int(x) for x in a.lengths.split(",") if x.strip()})
        trl_lengths = [] if a.no_peers else sorted({int(x) for x in a.trl_lengths.split(",") if x.strip()})
    except ValueError:
        ap.error("--lengths/--trl-lengths: comma-separated integers")
    if not lengths or a.rounds < 1 or a.min_steps < 1 or a.max_steps < a.min_steps or a.warmup < 1:
        ap.error("need a length, --rounds >= 1, 1 <= --min-steps <= --max-steps, --warmup >= 1")
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    import transformers

    from pack.offline import llama3_tokenizer_dir

    sizes = ["small", "70m"] if a.size == "both" else [a.size]
    l0 = lengths[0]
    # packs needed per length: warm-up (shortest length only) + the most timed steps any size can ask
    most = max(a.timed_tokens if s == "small" else a.timed_tokens_70m for s in sizes)
    need = {L: min(a.max_steps, max(a.min_steps, round(most / L))) + (a.warmup if L == l0 else 0)
            for L in lengths}
    mean_guess = 90
    n_samples = (a.warmup + a.max_steps) * 8  # padded x8 rows
    with tempfile.TemporaryDirectory(prefix="train_speed-") as tmp:
        work = Path(tmp)
        tok = llama3_tokenizer_dir(work / "tok")
        records = math.ceil(max(max((need[L] + 1) * L for L in lengths), n_samples * mean_guess)
                            / TOKENS_PER_RECORD_GUESS)
        for _ in range(6):
            inputs = write_inputs(work, records)
            data = {L: pack_dataset(tok, inputs, work / f"packed-{L}", L) for L in lengths}
            full = {L: full_packs(data[L], a.min_fill) for L in lengths}
            samples = samples_of_packs(data[l0], full[l0])
            short_of = [L for L in lengths if len(full[L]) < need[L]]
            if not short_of and len(samples) >= n_samples:
                break
            print(f"  {records} records: too few full packs at {short_of} or samples "
                  f"({len(samples)} of {n_samples}); more records", file=sys.stderr, flush=True)
            records = int(records * 1.5)
        else:
            raise SystemExit("could not get enough full packs")
        print(f"  {records} records packed at {', '.join(map(short, lengths))} "
              f"({time.perf_counter() - t_start:.0f}s)", file=sys.stderr, flush=True)
        size_results: list[dict] = []

        def result_of(sizes_so_far: list[dict]) -> dict:
            try:
                import trl
                trl_version = trl.__version__
            except ImportError:
                trl_version = None
            return {
                "benchmark": "train_speed",
                "note": "fp32 CPU training throughput; tokens = real input tokens incl. prompt tokens, padding "
                        "excluded; tokens_per_s / tokens_per_cpu_s: median over rounds of each round's rate over its "
                        "timed steps",
                "complete": all(x["complete"] for x in sizes_so_far) and len(sizes_so_far) == len(sizes),
                "device": "cpu", "threads": a.threads, "torch": torch.__version__,
                "transformers": transformers.__version__, "trl": trl_version,
                "python": platform.python_version(), "machine": platform.machine(), "cpu": cpu_name(),
                "cpus": os.cpu_count(), "lengths": lengths, "trl_lengths": trl_lengths, "rounds": a.rounds,
                "timed_tokens": {"small": a.timed_tokens, "70m": a.timed_tokens_70m},
                "min_steps": a.min_steps, "max_steps": a.max_steps,
                "warmup": a.warmup, "dense_max": a.dense_max, "min_fill": a.min_fill, "records": records,
                "argv": sys.argv[1:] if argv is None else list(argv),
                "wall_s": time.perf_counter() - t_start, "sizes": sizes_so_far,
            }

        out = Path(a.out)
        for s in sizes:
            # partial results after every row: a run cut short still leaves what it measured
            size_results.append(run_size(
                s, a, lengths, trl_lengths, work, tok, data, full, samples,
                progress=lambda part: write_outputs(result_of(size_results + [part]), out, quiet=True)))
    write_outputs(result_of(size_results), out)
    return 0


def write_outputs(result: dict, out: Path, quiet: bool = False) -> None:
    text = render(result)
    if not quiet:
        print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    out.with_suffix(".txt").write_text(text + "\n")
    png = plot(result, out.with_suffix(".png"))
    if not quiet:
        print(f"\nwrote {out}, {out.with_suffix('.txt')}" + (f", {png}" if png else ""))


def combine(paths: list[str], out: Path) -> int:
    """Merge the results of separate runs (e.g. one process per --size) into one JSON/text/chart."""
    results = []
    for p in paths:
        try:
            r = json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"{p}: cannot read a train_speed result ({e})")
        if r.get("benchmark") != "train_speed" or "sizes" not in r:
            raise SystemExit(f"{p}: not a train_speed result (no 'sizes'); rerun benchmarks/train_speed.py")
        results.append(r)
    merged = dict(results[0])
    merged["sizes"] = [s for r in results for s in r["sizes"]]
    merged["runs"] = [{k: v for k, v in r.items() if k != "sizes"} | {"file": str(p)}
                      for p, r in zip(paths, results)]
    merged["wall_s"] = max(r["wall_s"] for r in results)
    write_outputs(merged, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
