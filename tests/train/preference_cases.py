"""What the preference exactness tests compare against: the same pairs run unpacked, one pair at
a time, through a plain Hugging Face model (sdpa attention, full logits), and one train_step of
train-run on packed pairs. Shared by tests/train/test_preference.py (1 rank, in process) and its
2-rank torchrun driver (`python preference_cases.py CASES.json OUT.json` under torchrun)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

COMMON = ["--dtype", "fp32", "--lr", "1e-3", "--schedule", "constant", "--grad-clip", "0",
          "--seed", "0", "--lora-dropout", "0", "--no-export"]


def seg_logp(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed label log-probs of one segment run alone (full logits, log_softmax)."""
    logits = model(input_ids=ids.reshape(1, -1), use_cache=False).logits[0].float()
    lp = F.log_softmax(logits[:-1], -1)
    tgt = labels.reshape(-1)[1:]
    keep = tgt != -100
    return lp[keep].gather(1, tgt[keep][:, None]).sum()


def step_packs(args, rank_count: int) -> list[int]:
    """The pack ids of the first optimizer step over every data-parallel rank."""
    from pack.format import PackedDataset
    from train.data import DataState, PackStream

    stream = PackStream(PackedDataset(args.shards), seed=args.seed, world_size=rank_count,
                        micro_batch=args.micro_batch, grad_accum=args.grad_accum)
    return [i for r in range(rank_count)
            for ids in stream.step_pack_ids(DataState(), rank=r) for i in ids]


def unpacked_reference(args, pack_ids: list[int], reader=None) -> tuple[float, dict, int]:
    """(mean pair loss, gradients by parameter name, pairs) of the pairs in `pack_ids`, each pair
    run alone through the model train-run starts from (same seed: same LoRA init), sdpa
    attention. The reference: `reader` (stored values), the adapters disabled (--lora), a
    --ref-model copy, or none (simpo)."""
    from pack.format import PackedDataset
    from train.attention import unwrap_model
    from train.preference import DEFAULT_BETA, DEFAULT_SIMPO_GAMMA
    from train.setup import load_model, seed_everything

    seed_everything(args.seed)
    model, _ = load_model(args, args.model, "fp32", {"zero_optimization": {"stage": 0}})
    unwrap_model(model).set_attn_implementation("sdpa")
    model.train()
    ref_model = None
    if args.objective == "dpo" and reader is None and not (args.lora and not args.ref_model):
        from transformers import AutoModelForCausalLM

        ref_model = AutoModelForCausalLM.from_pretrained(args.ref_model or args.model,
                                                         dtype=torch.float32,
                                                         attn_implementation="sdpa")
    beta = args.beta or DEFAULT_BETA[args.objective]
    gamma = args.simpo_gamma if args.simpo_gamma is not None else DEFAULT_SIMPO_GAMMA
    ds = PackedDataset(args.shards)
    losses = []
    for i in pack_ids:
        pack = ds[i]
        cu = pack["cu_seqlens"].tolist()
        segs = [(torch.from_numpy(pack["input_ids"][s:e].astype(np.int64)),
                 torch.from_numpy(pack["labels"][s:e].astype(np.int64)))
                for s, e in zip(cu[:-1], cu[1:])]
        stored = None if reader is None else reader[i]
        for k in range(0, len(segs), 2):
            pc, pr = (seg_logp(model, *segs[j]) for j in (k, k + 1))
            if args.objective == "simpo":
                nc, nr = (int((segs[j][1][1:] != -100).sum()) for j in (k, k + 1))
                z = beta * (pc / nc - pr / nr) - gamma
            else:
                with torch.no_grad():
                    if stored is not None:
                        rc, rr = (torch.tensor(float(stored[j])) for j in (k, k + 1))
                    elif ref_model is not None:
                        rc, rr = (seg_logp(ref_model, *segs[j]) for j in (k, k + 1))
                    else:
                        with model.disable_adapter():
                            rc, rr = (seg_logp(model, *segs[j]) for j in (k, k + 1))
                z = beta * ((pc - rc) - (pr - rr))
            losses.append(-F.logsigmoid(z))
    loss = torch.stack(losses).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, len(losses)


def packed_step(run) -> tuple[object, dict]:
    """(train_step's StepResult, full gradients by name before the update) of run's next step."""
    from deepspeed.utils import safe_get_full_grad

    from train.loop import train_step

    grads = {}

    def grab(engine):
        zero0 = engine.zero_optimization_stage() == 0
        for n, p in engine.module.named_parameters():
            if p.requires_grad:
                g = p.grad if zero0 else safe_get_full_grad(p)
                grads[n] = g.detach().clone().float()

    res = train_step(run, run.stream.next_step()[0], grab)
    return res, grads


def rel_grad_error(got: dict, want: dict) -> float:
    """The largest relative error (norm of the difference / norm) over parameters with a
    non-zero reference gradient; every reference gradient must be present."""
    assert set(want) <= set(got), sorted(set(want) - set(got))[:3]
    errs = [float((got[n] - g).norm() / g.norm()) for n, g in want.items() if g.norm() > 0]
    assert errs
    return max(errs)


def driver(cases_file: str, out_file: str) -> None:
    """Under torchrun: for each case (argv, reference kind), one packed step on every rank and
    the unpacked reference of the same pairs; rank 0 writes the comparison."""
    from train.cli import parse_run_args
    from train.dist import setup_distributed
    from train.evaluate import evaluate, open_eval_set
    from train.loop import _unset_hf_deepspeed_config
    from train.setup import build

    dist = setup_distributed()
    results = {}
    for name, argv in json.load(open(cases_file)).items():
        args = parse_run_args(argv)
        reader = stored_reader(args)
        dp = dist.world_size // int(args.sequence_parallel or 1)
        ref_loss, ref_grads, pairs = unpacked_reference(args, step_packs(args, dp), reader)
        run = build(args, dist)
        run.eval_set = open_eval_set(args, run.manifest, run.model, dist, run.pref)
        before = evaluate(run) if run.eval_set is not None else None  # the initial weights
        res, grads = packed_step(run)
        if dist.is_main:
            results[name] = {"loss": res.loss, "ref_loss": ref_loss, "pairs": res.pairs["pairs"],
                             "ref_pairs": pairs, "grad_err": rel_grad_error(grads, ref_grads),
                             "reference": run.pref.reference, "eval": before}
        run.engine = run.model = run.keep_alive = None
        _unset_hf_deepspeed_config()
    if dist.is_main:
        Path(out_file).write_text(json.dumps(results))


def stored_reader(args):
    """The stored reference reader a --ref-logps stored run uses (for the unpacked side)."""
    if args.ref_logps != "stored":
        return None
    from pack.format import read_manifest
    from pack.reference import ReferenceReader, find_reference, model_fingerprint

    entry = find_reference(read_manifest(args.shards), model_fingerprint(args.ref_model or args.model))
    return ReferenceReader(args.shards, entry)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(driver(sys.argv[1], sys.argv[2]))
