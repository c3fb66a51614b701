"""Setting up a preference run (train-run --objective dpo|simpo): the objective against the
dataset's kind, and the reference log-probs' source.

Reference (DPO only; SimPO has none), chosen by --ref-logps:
  auto    stored when the training set (and the eval set, if any) has pack-ref's log-probs for the
          reference model's fingerprint (pack.reference), else live
  stored  those log-probs; refused in one line when a dataset lacks them
  live    a reference forward in every micro-step: under --lora the frozen base (the adapters
          disabled, no gradient); otherwise a frozen copy of --ref-model (default: --model),
          partitioned by its own DeepSpeed engine under ZeRO-3
The reference model is --ref-model, default --model; with --lora and no --ref-model the frozen
base is that same --model. Which one is used is printed at start.
"""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path
from typing import Any

from pack.errors import PacktrainError
from train.dist import log0
from train.preference import DEFAULT_BETA, DEFAULT_SIMPO_GAMMA, Preference

REF_MODES = ("auto", "stored", "live")


def check_objective(args: Namespace, manifest: dict, where: str) -> None:
    """--objective against a dataset's kind, in one line naming both."""
    from pack.format import is_preference

    objective, pairs = args.objective, is_preference(manifest)
    if objective == "sft" and pairs:
        raise PacktrainError(f"{where}: a preference dataset (chosen/rejected pairs); train it "
                             f"with --objective dpo or --objective simpo")
    if objective != "sft" and not pairs:
        raise PacktrainError(f"--objective {objective}: {where} is an SFT dataset, not pairs; "
                             f"pack preference pairs with pack-build, or use --objective sft")


def check_objectives(args: Namespace, manifest: dict) -> None:
    """--objective against the training set and the eval set (before any model is loaded)."""
    check_objective(args, manifest, f"--shards {getattr(args, 'shards_url', None) or args.shards}")
    if getattr(args, "eval_shards", None):
        from pack.format import read_manifest

        where = getattr(args, "eval_shards_url", None) or args.eval_shards
        check_objective(args, read_manifest(args.eval_shards), f"--eval-shards {where}")


def check_preference_args(args: Namespace) -> None:
    """Options that only some objectives take (before anything is loaded)."""
    objective = args.objective
    if objective == "sft":
        for flag in ("beta", "simpo_gamma", "ref_model", "ref_logps"):
            if getattr(args, flag, None) is not None:
                raise PacktrainError(f"--{flag.replace('_', '-')}: only for --objective dpo or "
                                     f"simpo (this run trains --objective sft)")
        return
    if getattr(args, "shards_list", None) and len(args.shards_list) > 1:
        raise PacktrainError(f"--objective {objective}: mixtures of datasets (several --shards) "
                             f"are not supported for preference training; train on one dataset")
    if objective == "simpo":
        for flag in ("ref_model", "ref_logps"):
            if getattr(args, flag, None) is not None:
                raise PacktrainError(f"--{flag.replace('_', '-')}: SimPO uses no reference "
                                     f"model; leave it out or use --objective dpo")
    elif args.simpo_gamma is not None:
        raise PacktrainError("--simpo-gamma: only for --objective simpo")


def plan_preference(args: Namespace, manifest: dict, model_path: str) -> Preference | None:
    """The run's objective (None: SFT) and its reference source, decided and printed before any
    model is loaded: --objective against the datasets, stored log-probs found or refused."""
    check_objectives(args, manifest)
    if args.objective == "sft":
        return None
    beta = args.beta if args.beta is not None else DEFAULT_BETA[args.objective]
    if args.objective == "simpo":
        gamma = args.simpo_gamma if args.simpo_gamma is not None else DEFAULT_SIMPO_GAMMA
        log0(f"objective: simpo (beta {beta}, gamma {gamma}; no reference model)")
        return Preference("simpo", beta, gamma)
    ref_path = str(args.ref_model or model_path)
    mode = args.ref_logps or "auto"
    entries = _stored_entries(args, manifest, ref_path) if mode != "live" else None
    if entries is not None:
        log0(f"objective: dpo (beta {beta}); reference: stored log-probs of {ref_path} "
             f"({entries[0]['dir']})")
        return Preference("dpo", beta, reference="stored", train_entry=entries[0],
                          eval_entry=entries[1])
    if mode == "stored":
        raise PacktrainError(f"--ref-logps stored: {args.shards} (or the eval set) holds no "
                             f"reference log-probs for {ref_path}; run pack-ref {ref_path} on "
                             f"it, or use --ref-logps live")
    if args.lora and args.ref_model is None:
        log0(f"objective: dpo (beta {beta}); reference: live, the frozen base model "
             f"{model_path} (LoRA adapters disabled)")
        return Preference("dpo", beta, reference="adapter")
    log0(f"objective: dpo (beta {beta}); reference: live, a frozen copy of {ref_path}")
    return Preference("dpo", beta, reference="model", ref_path=ref_path)


def start_reference(pref: Preference | None, args: Namespace, dist: Any, ds_config: dict,
                    backend: str, sp: Any) -> Any:
    """After the policy is loaded: load a live reference model ('model'), or open the training
    set's stored log-probs ('stored': the reader is returned, for the data stream); else None.
    `backend`: the packtrain attention backend (before any Ulysses wrapper)."""
    if pref is None:
        return None
    if pref.reference == "stored":
        return open_reference(args.shards, pref.train_entry,
                              getattr(args, "shards_url", None) or args.shards)
    if pref.reference == "model":
        pref.ref_model, pref.ref_engine = load_reference_model(pref.ref_path, dist, ds_config,
                                                               backend, sp)
    return None


def _stored_entries(args: Namespace, manifest: dict, ref_path: str) -> tuple[dict, Any] | None:
    """(the training set's reference entry, the eval set's or None) when every dataset of the
    run holds log-probs of the model at `ref_path`; else None."""
    manifests = [manifest]
    if getattr(args, "eval_shards", None):
        from pack.format import read_manifest

        manifests.append(read_manifest(args.eval_shards))
    if not all(m.get("reference_logps") for m in manifests):
        return None
    from pack.reference import find_reference, model_fingerprint

    fingerprint = model_fingerprint(ref_path)
    found = [find_reference(m, fingerprint) for m in manifests]
    if any(e is None for e in found):
        return None
    return found[0], (found[1] if len(found) > 1 else None)


def eval_reference(pref: Preference | None, eval_dir: str) -> Any:
    """The eval set's stored-reference reader (stored runs), else None."""
    if pref is None or pref.reference != "stored":
        return None
    return open_reference(eval_dir, pref.eval_entry, eval_dir)


def open_reference(data_dir: str, entry: dict, where: str) -> Any:
    """A stored-reference reader over `data_dir`; a URL's cache view first fetches the entry's
    sidecar files (size and sha256 checked, like shards; a lock per file shares the work
    between ranks)."""
    from pack.reference import ReferenceReader
    from pack.remote import fetch_reference

    problems = fetch_reference(data_dir, entry)
    if problems:
        raise PacktrainError(f"{where}: the stored reference log-probs of {entry['model']} did "
                             f"not arrive intact ({problems[0]}); retry, or use --ref-logps live")
    return ReferenceReader(data_dir, entry)


def load_reference_model(ref_path: str, dist: Any, ds_config: dict, backend: str,
                         sp: Any) -> tuple[Any, Any]:
    """(the frozen reference model, its ZeRO-3 engine or None): same dtype and attention as the
    policy; under ZeRO-3 partitioned at load (the policy's HfDeepSpeedConfig is alive) and
    wrapped in an optimizer-less DeepSpeed engine, as TRL prepares its reference model."""
    from transformers import AutoModelForCausalLM

    from train.attention import enable_packed_attention
    from train.config import DTYPES

    if not Path(ref_path).is_dir():
        raise PacktrainError(f"--ref-model {ref_path}: no such model directory; pass a local "
                             f"Hugging Face model (default: --model)")
    dtype = "bf16" if "bf16" in ds_config else "fp16" if "fp16" in ds_config else "fp32"
    try:
        ref = AutoModelForCausalLM.from_pretrained(ref_path, dtype=DTYPES[dtype],
                                                   local_files_only=True,
                                                   trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PacktrainError(f"--ref-model {ref_path}: cannot load a causal LM ({msg})") from None
    ref.config.use_cache = False
    ref.requires_grad_(False)
    ref.eval()
    enable_packed_attention(ref, backend)
    if sp is not None:
        from train.sequence_parallel import enable_ulysses

        enable_ulysses(ref, backend, sp)
    if int(ds_config["zero_optimization"]["stage"]) != 3:
        return ref.to(dist.device), None
    import deepspeed

    cfg = {k: v for k, v in ds_config.items() if k not in ("gradient_clipping",)}
    engine, *_ = deepspeed.initialize(model=ref, config=cfg)
    engine.eval()
    return engine.module, engine
