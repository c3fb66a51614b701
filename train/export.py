"""DeepSpeed checkpoint -> Hugging Face model directory, offline (no process group, no GPU).

    export_checkpoint(OUTPUT, OUT)                 # full model, or the LoRA adapter when trained with --lora
    export_checkpoint(OUTPUT, OUT, merge=True)     # LoRA merged into the base weights: a full model

`checkpoint` may be a training OUTPUT directory, its ``checkpoints/`` directory (the ``latest`` tag is
used) or one tag directory (``checkpoints/step-00000010``). The model is rebuilt from
``OUTPUT/model_config/config.json`` (plus ``lora.json`` for LoRA runs), the full fp32 weights are
reassembled from DeepSpeed's files for any ZeRO stage 0-3 and loaded strictly (a missing or
unexpected tensor is an error, never a silently random weight), and the result is written as
safetensors with the tokenizer files beside it. The directory is built under ``OUT.tmp-PID`` and
renamed into place, so an interrupted export never looks complete.

Where the weights come from:

stage 0    ``mp_rank_00_model_states.pt['module']``: the whole model in its training dtype. With
           bf16/fp16 training DeepSpeed's optimizer wrapper keeps fp32 masters in the same file
           (``optimizer['fp32_groups']``, unnamed); they are matched back to parameter names by shape
           and value, falling back to the 16-bit module weights (with a warning) if they cannot be.
stage 1-3  DeepSpeed's own ``zero_to_fp32`` reassembly of the fp32 master partitions of every rank
           (frozen parameters, e.g. a LoRA base, come from the model-state files).

QLoRA runs (``model_config/qlora.json``): only the LoRA tensors are read from the checkpoint. The
adapter is written as for --lora; ``merge=True`` re-quantises the run's base model (run.json's
``model_path``) with the same bitsandbytes settings, dequantises it to the compute dtype and
merges the adapter into that, so the merged model computes what the QLoRA model did.

Loading safety: every ``torch.load`` here uses ``weights_only=True``. DeepSpeed's ``zero_to_fp32``
hard-codes ``weights_only=False`` (full pickle); we run it with its ``torch.load`` replaced by a
``weights_only=True`` load that allowlists only the few DeepSpeed classes its optimizer files hold
(``ZeroStageEnum``, ``fragment_address``, the loss scalers). A file holding anything else is refused.
The ``.pt`` files themselves are still pickle *format*; that is DeepSpeed's choice of container.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pack.errors import PacktrainError
from pack.files import write_atomic

EXPORT_INFO = "packtrain_export.json"
MODEL_STATE_STAGE0 = "mp_rank_00_model_states.pt"
GENERATION_FILES = ("generation_config.json",)


# ---------------------------------------------------------------- locating the checkpoint

def resolve_checkpoint(checkpoint: str | os.PathLike) -> tuple[Path, Path, str]:
    """Return (OUTPUT dir, checkpoints dir, tag) for an OUTPUT dir, a checkpoints dir or a tag dir."""
    p = Path(checkpoint)
    if not p.exists():
        raise PacktrainError(f"{p}: no such checkpoint; pass a train-run OUTPUT directory, its "
                             f"checkpoints/ directory or one checkpoints/step-NNNNNNNN directory")
    if not p.is_dir():
        raise PacktrainError(f"{p}: not a directory; pass a train-run OUTPUT directory, its "
                             f"checkpoints/ directory or a tag directory")
    if any(p.glob("*model_states.pt")):  # a tag directory
        return p.parent.parent, p.parent, p.name
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    latest = p / "latest"
    if not latest.is_file():
        if p.name == "checkpoints" or any(p.glob("step-*")):
            raise PacktrainError(f"{latest}: missing, so no checkpoint is complete (training stopped "
                                 f"before its first save?); pass a tag directory such as "
                                 f"{p}/step-NNNNNNNN explicitly, or train longer")
        raise PacktrainError(f"{p}: holds no DeepSpeed checkpoint (no checkpoints/, latest or "
                             f"*model_states.pt); pass a train-run OUTPUT directory")
    tag = latest.read_text().strip()
    if not tag or not (p / tag).is_dir():
        raise PacktrainError(f"{latest}: names tag {tag!r}, but {p / tag} does not exist; pass an "
                             f"existing tag directory under {p} explicitly")
    if not any((p / tag).glob("*model_states.pt")):
        raise PacktrainError(f"{p / tag}: no *model_states.pt files; the checkpoint is incomplete — "
                             f"pass an older tag directory under {p}")
    return p.parent, p, tag


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PacktrainError(f"{path}: missing; {what}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PacktrainError(f"{path}: not valid JSON ({e}); {what}") from None
    if not isinstance(data, dict):
        raise PacktrainError(f"{path}: expected a JSON object; {what}")
    return data


def _base_model_path(run: dict) -> str | None:
    """The --model the run started from, wherever run.json keeps it."""
    for d in (run, run.get("args") or {}, run.get("train_args") or {}):
        if isinstance(d, dict):
            for k in ("model", "model_path", "model_name_or_path"):
                if isinstance(d.get(k), str) and d[k]:
                    return d[k]
    return None


# ---------------------------------------------------------------- reading DeepSpeed files

def _allowed_globals() -> list:
    """The DeepSpeed classes its optimizer-state files pickle, which weights_only loads accept."""
    import importlib

    names = [("deepspeed.runtime.zero.config", "ZeroStageEnum"),
             ("deepspeed.utils.tensor_fragment", "fragment_address"),
             ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
             ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
             ("deepspeed.runtime.fp16.loss_scaler", "LossScaleProfile"),
             ("deepspeed.runtime.fp16.loss_scaler", "LossScaleConfig")]
    out = []
    for mod, name in names:
        try:
            obj = getattr(importlib.import_module(mod), name, None)
        except ImportError:
            obj = None
        if obj is not None:
            out.append(obj)
    return out


def safe_load(path: str | os.PathLike, mmap: bool = False, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True, accepting only tensors, containers and DeepSpeed's
    allowlisted bookkeeping classes. Errors name the file. train.checkpoint also loads DeepSpeed
    checkpoints for --resume through it."""
    import torch

    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # UnpicklingError, RuntimeError (truncated zip), ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PacktrainError(f"{path}: cannot be read as a weights-only torch file ({msg}); the "
                             f"checkpoint is corrupt, truncated, or holds objects packtrain does "
                             f"not load (no arbitrary pickle)") from None


class _WeightsOnlyTorch:
    """Stands in for the `torch` module inside deepspeed.utils.zero_to_fp32 so that its
    hard-coded torch.load(..., weights_only=False) becomes a weights_only=True load."""

    def __init__(self, torch_module):
        self._torch = torch_module

    def __getattr__(self, name):
        return getattr(self._torch, name)

    @staticmethod
    def load(f, map_location=None, weights_only=None, mmap=None, **_):
        return safe_load(f, mmap=bool(mmap))


@contextlib.contextmanager
def _weights_only_zero_to_fp32():
    import torch
    from deepspeed.utils import zero_to_fp32

    saved = zero_to_fp32.torch, zero_to_fp32.tqdm
    zero_to_fp32.torch = _WeightsOnlyTorch(torch)
    zero_to_fp32.tqdm = lambda it, *a, **k: it  # no progress bars on library use
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints as it goes
            yield zero_to_fp32
    finally:
        zero_to_fp32.torch, zero_to_fp32.tqdm = saved


def read_fp32_state_dict(checkpoints_dir: Path, tag: str, model=None) -> tuple[dict, list[str]]:
    """Full fp32 state dict of the trained module from one checkpoint tag, and warnings.
    `model` (the rebuilt module, names and shapes) is needed only for 16-bit stage-0 runs."""
    import torch

    tag_dir = checkpoints_dir / tag
    warnings: list[str] = []
    optim_files = sorted(tag_dir.glob("*_optim_states.pt"))
    if optim_files:  # ZeRO 1-3: reassemble fp32 master partitions
        with _weights_only_zero_to_fp32() as z:
            try:
                sd = z.get_fp32_state_dict_from_zero_checkpoint(str(checkpoints_dir), tag=tag)
            except PacktrainError:
                raise
            except (ValueError, FileNotFoundError, KeyError) as e:
                raise PacktrainError(f"{tag_dir}: DeepSpeed could not reassemble the weights "
                                     f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                     f"the checkpoint is incomplete (a rank's file missing?) — "
                                     f"export an older tag") from None
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, warnings

    f = tag_dir / MODEL_STATE_STAGE0
    if not f.is_file():
        raise PacktrainError(f"{tag_dir}: neither {MODEL_STATE_STAGE0} nor *_optim_states.pt; the "
                             f"checkpoint is incomplete — export an older tag")
    state = safe_load(f)
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict):
        raise PacktrainError(f"{f}: has no 'module' state dict; not a DeepSpeed model checkpoint")
    half = [k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32]
    if half:
        masters = _stage0_masters(state, module, model)
        if masters is None:
            warnings.append(f"{f}: fp32 master weights could not be matched to parameter names; "
                            f"exported the {module[half[0]].dtype} module weights upcast to fp32")
        else:
            module = {**module, **masters}
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}, warnings


def _stage0_masters(state: dict, module: dict, model) -> dict | None:
    """Name DeepSpeed's unnamed stage-0 fp32 masters: each must match one 16-bit module tensor
    of the same shape whose value is exactly the master rounded to 16 bits."""
    opt = state.get("optimizer")
    groups = opt.get("fp32_groups") if isinstance(opt, dict) else None
    if not groups or model is None:
        return None
    flat = [t for g in groups for t in (g if isinstance(g, (list, tuple)) else [g])]
    names = [n for n, p in model.named_parameters() if p.requires_grad and n in module]
    if len(flat) != len(names):
        return None
    out, free = {}, list(names)
    for t in flat:
        hit = next((n for n in free if tuple(module[n].shape) == tuple(t.shape)
                    and module[n].is_floating_point()
                    and torch_equal(t.to(module[n].dtype), module[n])), None)
        if hit is None:
            return None
        out[hit] = t
        free.remove(hit)
    return out


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


# ---------------------------------------------------------------- rebuilding the model

@contextlib.contextmanager
def _without_hf_zero3():
    """Hide a live transformers HfDeepSpeedConfig (train-run keeps one for ZeRO-3) while we
    build plain CPU models: otherwise from_config/peft run deepspeed.zero.Init, whose
    collectives hang when only rank 0 exports."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover
        yield
        return
    saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def _build_model(model_config: Path, lora: dict | None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(model_config), local_files_only=True,
                                            trust_remote_code=False)
    except Exception as e:
        raise PacktrainError(f"{model_config / 'config.json'}: cannot build a model config "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        no_init_weights = contextlib.nullcontext
    with no_init_weights():  # every weight is overwritten by the checkpoint, strictly
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = dict(lora, base_model_name_or_path=None)  # set from run.json when saving
        try:
            lcfg = LoraConfig(**lora)
        except (TypeError, ValueError) as e:
            raise PacktrainError(f"{model_config / 'lora.json'}: not a LoraConfig this peft reads "
                                 f"({e})") from None
        lcfg.inference_mode = False
        model = get_peft_model(model, lcfg)
    return config, model


def _tied_groups(model) -> list[set[str]]:
    by_id: dict[int, set[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), set()).add(n)
    return [s for s in by_id.values() if len(s) > 1]


def load_strict(model, state_dict: dict, where: str) -> None:
    """Load every parameter and persistent buffer; tied weights may appear under any one of their
    names. Missing, unexpected or misshapen tensors raise PacktrainError naming them."""
    expected = set(model.state_dict().keys())
    sd = dict(state_dict)
    for group in _tied_groups(model):
        present = [n for n in sorted(group) if n in sd]
        for n in present[1:]:
            if not torch_equal(sd[n], sd[present[0]]):
                raise PacktrainError(f"{where}: {present[0]} and {n} are tied in model_config/ "
                                     f"(tie_word_embeddings) but differ in the checkpoint; "
                                     f"model_config/config.json does not match the trained model")
        if present:
            for n in group:
                sd.setdefault(n, sd[present[0]])
    missing = sorted(expected - sd.keys())
    unexpected = sorted(sd.keys() - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise PacktrainError(f"{where}: the checkpoint does not match model_config/ (tensors "
                             f"{'; '.join(parts)}); was model_config/ or lora.json edited, or the "
                             f"checkpoint made by another run?")
    own = model.state_dict()
    for k in sorted(sd):
        if tuple(sd[k].shape) != tuple(own[k].shape):
            raise PacktrainError(f"{where}: tensor {k} has shape {tuple(sd[k].shape)}, the model "
                                 f"built from model_config/ wants {tuple(own[k].shape)}; the "
                                 f"checkpoint belongs to another model")
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------- writing

def _prepare_out(out_dir: Path) -> Path:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise PacktrainError(f"{out_dir}: exists and is not a directory; choose another path")
        if any(out_dir.iterdir()) and not (out_dir / EXPORT_INFO).is_file():
            raise PacktrainError(f"{out_dir}: exists, is not empty and is not a packtrain export; "
                                 f"choose another output path or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        if not _ours(tmp):
            raise PacktrainError(f"{tmp}: exists and was not made by train-export; move it away "
                                 f"and export again")
        shutil.rmtree(tmp)
    tmp.mkdir()
    _mark(tmp)
    return tmp


# A directory this program made and may delete holds this file naming the PID that made it.
# Names alone prove nothing: a user's OUT.old-2024 must survive every export.
PARTIAL_MARKER = ".packtrain-export-partial"


def _mark(d: Path) -> None:
    (d / PARTIAL_MARKER).write_text(f"{os.getpid()}\n")


def _ours(d: Path) -> bool:
    return (d / PARTIAL_MARKER).is_file() and not (d / PARTIAL_MARKER).is_symlink()


def _remove_stale(out_dir: Path) -> None:
    """Remove OUT.tmp-PID / OUT.old-PID left by an export that was killed (its PID is gone): only
    directories that carry this program's marker with that same PID."""
    for p in out_dir.parent.glob(f"{out_dir.name}.*-*"):
        kind, _, pid = p.name[len(out_dir.name) + 1:].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or p.is_symlink() or not p.is_dir():
            continue
        if not _ours(p) or (p / PARTIAL_MARKER).read_text().strip() != pid:
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (PermissionError, OverflowError):
            pass


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished directory into place; a previous export is replaced only now."""
    from pack.files import fsync_dir

    old = None
    if out_dir.exists():
        old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
        _mark(out_dir)  # if we die between the renames, the next export may remove `old`
        os.replace(out_dir, old)
    (tmp / PARTIAL_MARKER).unlink()
    os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike,
                      merge: bool = False, dtype: str | None = None) -> Path:
    """Export a DeepSpeed checkpoint of a packtrain run as a Hugging Face model directory.

    checkpoint  OUTPUT, OUTPUT/checkpoints (uses `latest`) or OUTPUT/checkpoints/TAG
    out_dir     the directory to create (replaced only if it is an earlier packtrain export)
    merge       LoRA runs only: merge the adapter and write a full model instead of the adapter
    dtype       weights' dtype in the export ("float32", "bfloat16", "float16"); default: the
                dtype in model_config/config.json (the original model's). LoRA adapters stay fp32.

    Returns out_dir. Raises PacktrainError with a one-line message on any user-fixable problem.
    Safe to call in a training process on rank 0 alone (as train-run --export does): it uses no
    process group and builds its model outside any live ZeRO-3 HfDeepSpeedConfig.
    """
    with _without_hf_zero3():
        return _export(checkpoint, Path(out_dir), merge, dtype)


def _export(checkpoint, out_dir: Path, merge: bool, dtype: str | None) -> Path:
    from train.tiny import copy_tokenizer_files

    t0 = time.time()
    if dtype is not None:
        _torch_dtype(dtype)  # refuse a bad --dtype before any work
    output, ckpts, tag = resolve_checkpoint(checkpoint)
    model_config = output / "model_config"
    if not (model_config / "config.json").is_file():
        raise PacktrainError(f"{model_config / 'config.json'}: missing; export needs the "
                             f"model_config/ directory train-run writes beside checkpoints/ — "
                             f"pass the run's OUTPUT directory (or restore model_config/)")
    lora = None
    if (model_config / "lora.json").is_file():
        lora = _read_json(model_config / "lora.json", "it is written by train-run --lora")
    if merge and lora is None:
        raise PacktrainError(f"{model_config}: no lora.json, so this run trained the full model; "
                             f"--merge applies only to LoRA runs — drop --merge")
    run = {}
    if (output / "run.json").is_file():
        run = _read_json(output / "run.json", "it is written by train-run")
    base_path = _base_model_path(run)
    qlora = _qlora_settings(model_config, lora)

    if qlora is not None:
        config, model, warnings = _qlora_model(model_config, lora, qlora, base_path, ckpts, tag,
                                               merge)
    else:
        config, model = _build_model(model_config, lora)
        state_dict, warnings = read_fp32_state_dict(ckpts, tag, model)
        load_strict(model, state_dict, str(ckpts / tag))
        del state_dict

    default_dtype = qlora["compute_dtype"] if qlora is not None else _config_dtype(config)
    target_dtype = _torch_dtype(dtype or default_dtype)
    tmp = _prepare_out(out_dir)
    try:
        if lora is not None and not merge:
            kind = "lora-adapter"
            model.peft_config["default"].base_model_name_or_path = base_path
            model.peft_config["default"].inference_mode = True
            model.save_pretrained(str(tmp), safe_serialization=True)
        else:
            kind = "merged" if lora is not None else "full"
            if lora is not None:
                model = model.merge_and_unload()
            model = model.to(target_dtype)
            model.save_pretrained(str(tmp), safe_serialization=True)
            for name in GENERATION_FILES:  # the original generation settings, not from_config's
                if (model_config / name).is_file():
                    shutil.copy2(model_config / name, tmp / name)
        copy_tokenizer_files(model_config, tmp)
        step = None
        state_file = ckpts / tag / "packtrain_state.json"
        if state_file.is_file():
            try:
                step = json.loads(state_file.read_text()).get("step")
            except (ValueError, AttributeError):
                step = None
        if qlora is not None:
            kind = "qlora-" + kind
        info = {"kind": kind, "checkpoint": str((ckpts / tag).resolve()), "tag": tag,
                "step": step, "base_model": base_path,
                **({"qlora": qlora} if qlora is not None else {}),
                "dtype": "float32" if kind == "lora-adapter" else str(target_dtype).split(".")[-1],
                "warnings": warnings, "seconds": round(time.time() - t0, 3)}
        write_atomic(tmp / EXPORT_INFO, (json.dumps(info, indent=2) + "\n").encode())
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------- QLoRA runs

def _qlora_settings(model_config: Path, lora: dict | None) -> dict | None:
    """model_config/qlora.json (train-run --qlora writes it), or None for other runs."""
    from train.qlora import SETTINGS_FILE

    f = model_config / SETTINGS_FILE
    if not f.is_file():
        return None
    s = _read_json(f, "it is written by train-run --qlora")
    if lora is None or not {"quant_type", "double_quant", "compute_dtype", "quant_storage"} <= s.keys():
        raise PacktrainError(f"{f}: a QLoRA run needs lora.json beside it and quant_type, "
                             f"double_quant, compute_dtype, quant_storage in it; restore the "
                             f"model_config/ train-run wrote")
    return s


def _qlora_model(model_config: Path, lora: dict, qlora: dict, base_path: str | None,
                 ckpts: Path, tag: str, merge: bool):
    """(config, peft model, warnings) of a --qlora checkpoint. The checkpoint holds the trained
    LoRA weights; the base is not taken from it. For the adapter alone, any base of the right
    shapes carries them (built from model_config/, as for --lora). For --merge, the base is the
    one trained against: the run's --model quantised again with qlora.json's settings (NF4
    quantisation is deterministic) and dequantised to the compute dtype."""
    from train.qlora import check_installed, dequantized_base

    if not merge:
        config, model = _build_model(model_config, lora)
    else:
        check_installed()
        if not base_path or not (Path(base_path) / "config.json").is_file():
            raise PacktrainError(f"{base_path or 'run.json'}: --merge of a --qlora run re-quantises "
                                 f"the base model it trained from, which is not there; restore "
                                 f"that model directory (run.json's model_path), or export the "
                                 f"adapter without --merge")
        base, packed = dequantized_base(base_path, qlora)
        _check_same_config(base.config, model_config)
        config = base.config
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(**dict(lora, base_model_name_or_path=None))
        lcfg.inference_mode = False
        model = get_peft_model(base, lcfg)
    state_dict, warnings = read_fp32_state_dict(ckpts, tag, model)
    if merge:
        _check_same_base(packed, state_dict, base_path, ckpts / tag)
    load_lora(model, state_dict, str(ckpts / tag))
    return config, model, warnings


def _check_same_base(packed: dict, state_dict: dict, base_path: str, where: Path) -> None:
    """The base re-quantised now must have the 4-bit bytes the checkpoint saved: a base model
    directory changed since training (same config, other weights) is refused, never merged."""
    from train.qlora import same_bytes

    for name, fresh in packed.items():
        key = "base_model.model." + name[:-len(".weight")] + ".base_layer.weight"
        saved = state_dict.get(key)
        if saved is None:
            raise PacktrainError(f"{where}: holds no 4-bit weight {key}; not a checkpoint of this "
                                 f"--qlora run's model")
        if not same_bytes(fresh, saved):
            raise PacktrainError(f"{base_path}: quantised again, its weight {name} differs from "
                                 f"the one the run trained against ({where}); the base model "
                                 f"changed since training — export with the original one")


def _check_same_config(config, model_config: Path) -> None:
    """The base found at export must be the model the run trained (its config)."""
    from train.checkpoint import _VOLATILE_CONFIG

    from transformers import AutoConfig

    want = AutoConfig.from_pretrained(str(model_config), local_files_only=True).to_dict()
    have = config.to_dict()
    diff = sorted(k for k in want.keys() | have.keys()
                  if k not in _VOLATILE_CONFIG and want.get(k) != have.get(k))
    if diff:
        raise PacktrainError(f"{model_config / 'config.json'}: the run's base model has changed "
                             f"since training ({', '.join(diff[:4])} differ); export with the "
                             f"base model the run trained from")


def load_lora(model, state_dict: dict, where: str) -> None:
    """Load exactly the model's LoRA tensors from `state_dict` (a --qlora checkpoint: its base
    tensors are 4-bit and not used). Missing or misshapen ones raise PacktrainError."""
    want = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    have = {k: v for k, v in state_dict.items() if "lora_" in k}
    missing, unexpected = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    if missing or unexpected or not want:
        raise PacktrainError(f"{where}: the checkpoint's LoRA tensors do not match lora.json "
                             f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} "
                             f"unexpected, e.g. {unexpected[:2]}); was model_config/ edited?")
    for k in sorted(want):
        if tuple(have[k].shape) != tuple(want[k].shape):
            raise PacktrainError(f"{where}: tensor {k} has shape {tuple(have[k].shape)}, lora.json "
                                 f"wants {tuple(want[k].shape)}; the checkpoint belongs to another run")
    model.load_state_dict(have, strict=False)


def _torch_dtype(name: str):
    import torch

    d = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise PacktrainError(f"dtype {name!r} is not a floating-point torch dtype; use float32, "
                             f"bfloat16 or float16")
    return d


def _config_dtype(config) -> str:
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if d is None:
        return "float32"
    return str(d).replace("torch.", "")


def export_main(argv: list[str] | None = None) -> int:
    """`train-export CHECKPOINT OUT [--merge] [--dtype D]`; D's train.cli may call or mirror it."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="train-export", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="train-run OUTPUT, OUTPUT/checkpoints or a tag directory")
    ap.add_argument("out", help="the Hugging Face model directory to write")
    ap.add_argument("--merge", action="store_true", help="LoRA: merge into the base weights")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="weights' dtype (default: the original model's, from its config)")
    a = ap.parse_args(argv)
    try:
        out = export_checkpoint(a.checkpoint, a.out, merge=a.merge, dtype=a.dtype)
    except PacktrainError as e:
        print(f"train-export: error: {e}", file=sys.stderr)
        return 1
    info = json.loads((out / EXPORT_INFO).read_text())
    print(f"exported {info['kind']} ({info['dtype']}) from {info['checkpoint']} to {out} "
          f"in {info['seconds']:.1f} s")
    for w in info["warnings"]:
        print(f"train-export: warning: {w}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(export_main())
