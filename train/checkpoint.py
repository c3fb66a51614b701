"""Checkpoints: save, find, check and restore them, and the run files beside them.

OUTPUT holds run.json and model_config/ (written at start: train-export rebuilds the model from
them), metrics.jsonl, and checkpoints/step-NNNNNNNN/ with DeepSpeed's files, our
packtrain_state.json (step, data position, counters, the run's identity) and one
rng_state_R.json per rank.

* Checkpoints are complete or ignored: `latest` is written last and only names a step directory
  whose every file is written and fsynced; --resume auto follows it, so a step directory left
  half-written by a crash is skipped, and is deleted before the same step is saved again.
* A resume writes only into its own run or a new, empty --output, and refuses a checkpoint of
  another model, LoRA setting, ZeRO stage or tokenizer (another dataset only with
  --allow-dataset-change).
* Nothing is unpickled: RNG states are JSON, and DeepSpeed's own loads (which use
  torch.load(weights_only=False)) are redirected to train.export.safe_load (weights only, a short
  allowlist of DeepSpeed classes).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pack.errors import PacktrainError
from pack.files import write_atomic
from train.data import DataState
from train.dist import barrier, log0, on_rank0
from train.setup import Run

STATE_FILE = "packtrain_state.json"
LATEST = "latest"


def tag_for(step: int) -> str:
    """The step directory's name: step-00000042."""
    return f"step-{step:08d}"


def rng_file(rank: int) -> str:
    """The file of rank `rank`'s RNG states in a step directory."""
    return f"rng_state_{rank}.json"


# ---------------------------------------------------------------- nothing to unpickle

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state_json() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as plain JSON: nothing to unpickle on resume."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": [version, list(internal), gauss],
          "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
          "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        st["cuda"] = [_b64(t) for t in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state_json(st: dict) -> None:
    """Restore what rng_state_json returned."""
    version, internal, gauss = st["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss),
                         float(cached)))
    torch.set_rng_state(_unb64(st["torch"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(x) for x in st["cuda"]])


def safe_deepspeed_loads(engine: Any) -> None:
    """DeepSpeed 0.19's TorchCheckpointEngine.load calls torch.load(weights_only=False), i.e. it
    unpickles arbitrary objects from checkpoint files; every model/optimizer load of
    engine.load_checkpoint goes through engine.checkpoint_engine.load, so point it at the
    weights-only loader export uses (a file holding anything else is refused, naming it)."""
    from train.export import safe_load

    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or not hasattr(ce, "load"):
        raise RuntimeError("DeepSpeed engine has no checkpoint_engine.load; cannot make checkpoint "
                           "loading pickle-free with this DeepSpeed version")

    def load(path, map_location=None):
        # only a device can be honoured without unpickling; DeepSpeed's callables keep storages
        # where they are, i.e. on CPU here, and load_state_dict copies to the device
        loc = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
        return safe_load(path, map_location=loc)

    ce.load = load


# ---------------------------------------------------------------- save

def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:  # another rank's temporary file may be renamed under us: it fsyncs its own
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _current_latest(ckpt_root: Path) -> str | None:
    f = ckpt_root / LATEST
    return f.read_text().strip() if f.is_file() else None


def save_checkpoint(run: Run, data_state: DataState, epoch: int, elapsed: float) -> Path:
    """All ranks save (DeepSpeed is collective) and their RNG states and fsync what they see;
    after a barrier rank 0 writes packtrain_state.json, then (after a barrier) `latest`,
    atomically: a checkpoint counts only once `latest` names it. A directory of the same tag left
    by a killed earlier attempt is removed first, so no stale file of it survives."""
    ckpt_root = run.out / "checkpoints"
    tag = tag_for(run.step)

    def clear_stale() -> None:
        if (ckpt_root / tag).exists() and _current_latest(ckpt_root) != tag:
            shutil.rmtree(ckpt_root / tag)
    on_rank0(run.dist, clear_stale)
    state = {"step": run.step, "epoch": epoch, "data": data_state.to_dict(),
             "world_size": run.dist.world_size, "seed": run.args.seed,
             "micro_batch": run.args.micro_batch, "grad_accum": run.args.grad_accum,
             "tokens_seen": run.tokens_seen, "label_tokens_seen": run.label_tokens_seen,
             "skipped_steps": run.skipped_steps, "elapsed_s": elapsed,
             "total_steps": run.total_steps, "identity": run_identity(run),
             "best_eval": run.best_eval}
    run.engine.save_checkpoint(str(ckpt_root), tag=tag, client_state={"packtrain": state},
                               save_latest=False)
    run.hooks.fault("kill-in-ckpt", run.step, run.dist.rank)
    write_atomic(ckpt_root / tag / rng_file(run.dist.rank),
                 (json.dumps(rng_state_json()) + "\n").encode())
    _fsync_tree(ckpt_root / tag)  # `latest` must never name data still in the page cache
    barrier()  # every rank has saved
    on_rank0(run.dist, lambda: write_atomic(ckpt_root / tag / STATE_FILE,
                                            (json.dumps(state, indent=2) + "\n").encode()))
    on_rank0(run.dist, lambda: write_atomic(ckpt_root / LATEST, (tag + "\n").encode()))
    return ckpt_root / tag


# ---------------------------------------------------------------- resume

def find_resume(arg: str | None, out: Path) -> Path | None:
    """--resume auto: OUTPUT/checkpoints/latest if present, else None (fresh start).
    --resume PATH: a step directory, a checkpoints directory or a run OUTPUT directory."""
    if not arg:
        return None
    if arg == "auto":
        latest = out / "checkpoints" / LATEST
        if not latest.is_file():
            return None
        return out / "checkpoints" / latest.read_text().strip()
    p = Path(arg)
    for cand in (p, p / "checkpoints"):
        if (cand / LATEST).is_file():
            return cand / (cand / LATEST).read_text().strip()
    if (p / STATE_FILE).is_file():
        return p
    raise PacktrainError(f"--resume {arg}: no complete checkpoint there (expected a step directory "
                         f"with {STATE_FILE}, or a directory with a '{LATEST}' file)")


def resume_point(arg: str | None, out: Path) -> Path | None:
    """The checkpoint --resume `arg` names for a run into `out` (None: a fresh start), refusing to
    resume into another run's directory or to start afresh over a run with checkpoints."""
    for where in (out, *out.parents):  # the nearest existing one must be a directory
        if where.exists() or where.is_symlink():
            if not where.is_dir():
                raise PacktrainError(f"--output {out}: {where} exists and is not a directory; "
                                     f"choose another path")
            break
    resume_from = find_resume(arg, out)
    if resume_from is not None:
        check_resume_target(resume_from, out)
    if resume_from is None and (out / "checkpoints" / LATEST).is_file():
        raise PacktrainError(f"{out} already holds a run with checkpoints; pass --resume auto to "
                             f"continue it, or choose another --output")
    return resume_from


# Model config keys that say nothing about the weights' shapes or meaning.
_VOLATILE_CONFIG = {"_attn_implementation", "_attn_implementation_internal", "_name_or_path",
                    "transformers_version", "torch_dtype", "dtype", "use_cache", "_commit_hash",
                    "quantization_config", "_pre_quantization_dtype"}  # --qlora: its own key


def run_identity(run: Run) -> dict:
    """What a checkpoint must share with the run that resumes it: the model (its config), the
    dataset (manifest hash, tokenizer fingerprint) and the arguments that shape the weights and
    optimizer state (LoRA, ZeRO stage)."""
    from train.attention import unwrap_model

    cfg = {k: v for k, v in unwrap_model(run.model).config.to_dict().items()
           if k not in _VOLATILE_CONFIG}
    a = run.args
    return {
        "model_config_sha256": hashlib.sha256(
            json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest(),
        "manifest_sha256": run.manifest_sha256,
        "tokenizer_fingerprint": run.manifest["tokenizer"].get("fingerprint"),
        "lora": ({"r": a.lora_r, "alpha": a.lora_alpha, "targets": a.lora_targets}
                 if a.lora else None),
        "zero": a.zero,
        "qlora": bool(getattr(a, "qlora", False)),
    }


def check_resume_target(resume_from: Path, out: Path) -> None:
    """A resume writes only into the run it resumes, or into a new, empty --output: never into
    another run, whose checkpoints and metrics it would overwrite and mix. (resume_point has
    checked that `out` can be a directory.)"""
    same_run = resume_from.resolve().parent == (out / "checkpoints").resolve()
    if same_run or not out.exists() or not any(out.iterdir()):
        return
    raise PacktrainError(f"--output {out} holds another run, and --resume {resume_from} belongs to "
                         f"a different one; resume it into its own run directory or into a new, "
                         f"empty --output")


def check_identity(run: Run, path: Path, saved: dict | None) -> bool:
    """Refuse a checkpoint of another model or of other LoRA/ZeRO settings in one line; a
    different dataset only with --allow-dataset-change. Returns True when the dataset changed
    (its data position then means nothing here). Checkpoints older than this check carry no
    identity and are taken as they are."""
    if not saved:
        return False
    now = run_identity(run)
    what = {"model_config_sha256": "another model (its config differs)",
            "lora": "other LoRA settings", "zero": "another ZeRO stage",
            "qlora": "another --qlora setting"}
    for key, text in what.items():
        if key in saved and saved[key] != now[key]:
            raise PacktrainError(f"--resume {path}: the checkpoint is of {text} than this run "
                                 f"({saved[key]} vs {now[key]}); resume with the arguments and "
                                 f"model it was trained with")
    if saved.get("tokenizer_fingerprint") != now["tokenizer_fingerprint"]:
        raise PacktrainError(f"--resume {path}: the checkpoint was trained on a dataset of another "
                             f"tokenizer; its token ids mean something else here")
    changed = saved.get("manifest_sha256") != now["manifest_sha256"]
    if changed and not run.args.allow_dataset_change:
        raise PacktrainError(f"--resume {path}: the checkpoint was trained on another dataset "
                             f"(manifest sha256 differs); pass --allow-dataset-change to continue "
                             f"on this one from its start")
    return changed


def restore_checkpoint(run: Run, path: Path) -> DataState:
    """Model, optimizer and scheduler via DeepSpeed; data position, counters and RNG states."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise PacktrainError(f"{path}: incomplete checkpoint ({STATE_FILE} missing)")
    state = json.loads(state_file.read_text())
    new_data = check_identity(run, path, state.get("identity"))
    try:
        # --qlora: the saved module state also holds bitsandbytes' quant-state tensors of the
        # 4-bit base (absmax, quant_map, ...), which load_state_dict calls unexpected; the base
        # comes from --model (check_identity has matched model and LoRA settings), the LoRA
        # weights and optimizer from here
        load_path, _ = run.engine.load_checkpoint(str(path.parent), tag=path.name,
                                                  load_optimizer_states=True,
                                                  load_lr_scheduler_states=True,
                                                  load_module_strict=not getattr(run.args, "qlora", False))
    except (RuntimeError, KeyError, ValueError) as e:  # a checkpoint older than its identity
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise PacktrainError(f"--resume {path}: the checkpoint does not fit this model ({msg}); "
                             f"resume with the model and arguments it was trained with") from None
    if load_path is None:
        raise PacktrainError(f"{path}: DeepSpeed could not load this checkpoint")
    run.step = int(state["step"])
    run.tokens_seen = int(state.get("tokens_seen", 0))
    run.label_tokens_seen = int(state.get("label_tokens_seen", 0))
    run.elapsed_before = float(state.get("elapsed_s", 0.0))
    run.skipped_steps = int(state.get("skipped_steps", 0))
    run.best_eval = state.get("best_eval")
    if int(state["seed"]) != run.args.seed:
        log0(f"warning: checkpoint seed {state['seed']} != --seed {run.args.seed}; the data "
             f"order follows --seed from here on")
    rng = path / rng_file(run.dist.rank)
    if rng.is_file() and int(state["world_size"]) == run.dist.world_size:
        try:
            set_rng_state_json(json.loads(rng.read_text()))
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise PacktrainError(f"{rng}: not a valid RNG state ({e}); the checkpoint is "
                                 f"corrupt — resume from an older step directory") from None
    elif int(state["world_size"]) == run.dist.world_size:
        log0(f"warning: {rng.name} missing (a checkpoint written before RNG states were JSON?); "
             f"RNG states re-seeded")
    else:
        log0("warning: world size changed since the checkpoint; RNG states re-seeded")
    if new_data:
        log0("note: another dataset than the checkpoint's (--allow-dataset-change): the data "
             "stream starts at its beginning")
        return DataState()
    return DataState.from_dict(state["data"])


def trim_metrics(path: Path, upto_step: int) -> None:
    """After a resume, drop lines of steps the checkpoint does not include."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= upto_step:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError, ValueError):
            continue
    write_atomic(path, ("\n".join(keep) + ("\n" if keep else "")).encode())


# ---------------------------------------------------------------- run files

def write_run_files(run: Run) -> None:
    """run.json and model_config/ (rank 0, at start)."""
    from train.tiny import copy_tokenizer_files

    out = run.out
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    try:
        from importlib.metadata import version
        pt_version = version("packtrain")
    except Exception:
        pt_version = "unknown"
    info = {
        "packtrain_version": pt_version,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(run.args).items()},
        "model_path": str(Path(run.model_path).resolve()),
        "shards": str(Path(run.args.shards).resolve()),
        "manifest_sha256": run.manifest_sha256,
        "tokenizer_fingerprint": run.manifest["tokenizer"].get("fingerprint"),
        **({"datasets": run.datasets} if run.datasets else {}),
        "world_size": run.dist.world_size,
        "dtype": run.dtype,
        "attention": run.backend,
        "total_steps": run.total_steps,
        "steps_per_epoch": run.stream.steps_per_epoch,
        "global_batch_packs": run.stream.global_batch_packs,
        "deepspeed_config": run.ds_config,
        "lora": bool(run.args.lora),
        "qlora": bool(getattr(run.args, "qlora", False)),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_atomic(out / "run.json", (json.dumps(info, indent=2, default=str) + "\n").encode())
    mc = out / "model_config"
    mc.mkdir(parents=True, exist_ok=True)
    from train.attention import unwrap_model

    base = unwrap_model(run.model)
    cfg = base.config
    cfg.save_pretrained(str(mc))
    # the exported model should not name our training-only attention backend
    cfg_path = mc / "config.json"
    d = json.loads(cfg_path.read_text())
    if str(d.get("_attn_implementation", "")).startswith("packtrain_"):
        d.pop("_attn_implementation")
    # --qlora: the exported model is plain (dequantised); how the base was quantised is in
    # qlora.json, which export reads to rebuild that base
    d.pop("quantization_config", None)
    d.pop("_pre_quantization_dtype", None)
    write_atomic(cfg_path, (json.dumps(d, indent=2, sort_keys=True) + "\n").encode())
    if getattr(run.args, "qlora", False):
        from train.qlora import SETTINGS_FILE, settings

        write_atomic(mc / SETTINGS_FILE,
                     (json.dumps(settings(run.dtype), indent=2, sort_keys=True) + "\n").encode())
    gen = getattr(base, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(str(mc))
        except Exception:  # an invalid generation config must not stop training
            pass
    src = run.model_path
    if not any((Path(src) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        src = run.manifest["tokenizer"]["path"]
    copy_tokenizer_files(src, mc)
    lora = lora_config_dict(run.model)
    if lora is not None:
        write_atomic(mc / "lora.json", (json.dumps(lora, indent=2, sort_keys=True) + "\n").encode())


def lora_config_dict(model: Any) -> dict | None:
    """The peft LoRA config of `model` as plain JSON (None without LoRA): model_config/lora.json."""
    cfg = getattr(model, "peft_config", None)
    if not cfg:
        return None
    d = next(iter(cfg.values())).to_dict()

    def clean(v):
        if isinstance(v, (set, frozenset, tuple)):
            return sorted(clean(x) for x in v) if isinstance(v, (set, frozenset)) else [clean(x) for x in v]
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if hasattr(v, "value") and not isinstance(v, (int, float, str)):  # enums
            return v.value
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        return str(v)
    return clean(d)
