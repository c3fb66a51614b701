"""Validation loss during train-run (--eval-shards, --eval-every, --eval-max-packs) and the
checkpoint of the lowest one (--save-best); the flags themselves: train.eval_args.

The eval set
------------
Any packed dataset (a directory or a URL, fetched and checked like --shards) with the training
data's tokenizer fingerprint; by default SHARDS/eval when it holds a manifest.json (the held-out
split pack-build writes), `--no-eval` to skip it. Refused in one line: another tokenizer, a
max_length above what the run already takes (the training data's and the model's positions),
a broken shard (sizes, sha256 unless --no-verify, every pack invariant: train.checks).

The loss
--------
The first `--eval-max-packs` packs (default all) are split over ranks by stride (rank r takes
packs r, r + W, ...: deterministic, no shuffling), `--micro-batch` packs per row. Every row goes
through the same engine forward and `packed_loss` as training (train.forward.micro_loss) with
the engine in eval mode (dropout, LoRA dropout off) and without gradients; the summed CE and the
label tokens are all-reduced, so

    eval_loss = sum of per-token CE over every label token of the eval packs / label tokens

which is the per-token loss of the same samples run one at a time (tests/train/test_eval.py: to
~1e-7). Under ZeRO-3 a forward gathers parameters collectively, so every rank runs the same
number of forwards: a rank with fewer rows runs its last ones on pack 0 with weight 0. The
module's previous train/eval mode is restored afterwards.

When
----
At step 0 (a fresh run: its own metrics.jsonl line {"step": 0, "eval_loss", "eval_tokens"}), at
every --eval-every N steps and at the last step, added to that step's metrics line. A resumed run
does not evaluate its start again: the step it resumes at already has its line (or was no eval
step), and the weights are the same.

--save-best
-----------
At an eval step whose loss is below every earlier one, the step is checkpointed (unless it
already is) and then `checkpoints/best` names it, written atomically after the checkpoint is
complete, as `latest` is. The best loss and step travel in each checkpoint's
packtrain_state.json (`best_eval`), so a resumed run keeps comparing against them and rewrites
`best` to the step its checkpoint knew (a later best of the abandoned branch is forgotten).
"""

from __future__ import annotations

import math
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pack.errors import PacktrainError
from pack.files import file_sha256, write_atomic
from pack.format import MANIFEST, PackedDataset, read_manifest
from train.checkpoint import save_checkpoint, tag_for
from train.data import checked_pack, collate, with_reference
from train.dist import Dist, all_reduce_sum, log0, on_rank0
from train.forward import micro_loss, micro_pairs
from train.preference import STATS, pair_metrics
from train.setup import Run

BEST = "best"  # checkpoints/best: the step directory of the lowest eval loss


# ---------------------------------------------------------------- the eval set

@dataclass
class EvalSet:
    """The packs evaluated: the first `packs` of `ds`."""

    ds: PackedDataset
    packs: int
    where: str  # for messages: the directory or the redacted URL
    identity: str  # manifest sha256 and pack count: which losses are comparable
    reference: Any = None  # a preference run's stored reference log-probs (pack.reference)


def open_eval_set(args: Namespace, manifest: dict, model: Any, dist: Dist,
                  pref: Any = None) -> EvalSet | None:
    """Check and open args.eval_shards (None: no evaluation): the training data's tokenizer, a
    max_length the run takes, ids the model's embeddings hold, sound shards (rank 0 scans)."""
    if not getattr(args, "eval_shards", None):
        return None
    from pack.remote import open_dataset
    from train.attention import unwrap_model
    from train.checks import check_data, check_same_tokenizer

    where = args.eval_shards_url or str(args.eval_shards)
    em = read_manifest(args.eval_shards)
    check_same_tokenizer(f"--eval-shards {where}", em, "the training data", manifest,
                         "re-pack it with the training data's tokenizer")
    positions = getattr(unwrap_model(model).config, "max_position_embeddings", None) or 0
    limit = max(int(manifest["max_length"]), int(positions))
    if int(em["max_length"]) > limit:
        raise PacktrainError(f"--eval-shards {where}: packs of up to {em['max_length']} tokens, "
                             f"more than this run takes ({limit}: the training data's max_length "
                             f"and the model's positions); re-pack it with --max-length {limit}")
    verify = args.verify if args.verify is not None else not args.eval_shards_url
    on_rank0(dist, lambda: check_data(args.eval_shards, em, model, verify))
    ds = open_dataset(args.eval_shards, em)
    packs = min(len(ds), args.eval_max_packs or len(ds))
    if packs == 0:
        raise PacktrainError(f"--eval-shards {where}: the dataset holds no packs")
    log0(f"eval set: {where}, {packs} of {len(ds)} packs, at step 0"
         + (f", every {args.eval_every} steps" if args.eval_every else "") + " and at the end")
    sha = file_sha256(Path(args.eval_shards) / MANIFEST)
    from train.preference_setup import eval_reference

    return EvalSet(ds, packs, where, f"{sha}:{packs}", eval_reference(pref, args.eval_shards))


# ---------------------------------------------------------------- the loss

def rank_rows(packs: int, rank: int, world_size: int,
              micro_batch: int) -> tuple[list[list[int]], int]:
    """(this rank's rows of pack ids, forwards every rank runs): packs split by stride, rows of
    `micro_batch` packs; the forward count is the largest any rank needs."""
    mine = list(range(rank, packs, world_size))
    rows = [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]
    return rows, math.ceil(math.ceil(packs / world_size) / micro_batch)


def evaluate(run: Run) -> dict:
    """{"eval_loss", "eval_tokens"} of the eval set (the same on every rank), see the module
    doc. eval_tokens: the label tokens the loss is over. A preference run: the mean pair loss
    and the pair metrics (train.preference.pair_metrics) over every pair of the eval packs."""
    es, engine, dist, sp = run.eval_set, run.engine, run.dist, run.sp
    # under --sequence-parallel a group shares its rows, each rank evaluating its piece
    rank, world = (sp.dp_rank, sp.dp_size) if sp is not None else (dist.rank, dist.world_size)
    rows, forwards = rank_rows(es.packs, rank, world, run.args.micro_batch)
    was_training = engine.module.training
    engine.eval()
    pref = run.pref
    # the pairs of a sequence-parallel group are counted by its first rank (train.loop)
    share = 0.0 if pref is not None and sp is not None and sp.rank else 1.0
    sums = torch.zeros(len(STATS) if pref is not None else 1, dtype=torch.float64,
                       device=dist.device)
    count = 0
    try:
        with torch.no_grad():
            for k in range(forwards):
                # past its own rows a rank runs a stand-in: ZeRO-3's gathers are collectives
                ids = rows[k] if k < len(rows) else [0]
                mb = collate([with_reference(checked_pack(es.ds, i), es.reference, i)
                              for i in ids], ids)
                if sp is not None:
                    from train.sequence_parallel import slice_micro_batch

                    mb = slice_micro_batch(mb, sp)
                mb = mb.to(dist.device)
                if pref is None:
                    loss, n = micro_loss(engine, mb, run.args.loss_chunk)
                    stats = loss.double().reshape(1)
                else:
                    _, stats = micro_pairs(engine, mb, run.args.loss_chunk, pref, sp)
                    n = mb.pairs * share
                if k < len(rows):
                    sums += stats * share
                    count += n
    finally:
        engine.train(was_training)
    *totals, n = all_reduce_sum([*sums.tolist(), float(count)], dist.device)
    if pref is not None:
        return pair_metrics(totals, n, prefix="eval_")
    return {"eval_loss": totals[0] / n if n else None, "eval_tokens": int(n)}


def eval_due(run: Run) -> bool:
    """Whether the step just done (run.step) is evaluated: every --eval-every steps, the last."""
    every = run.args.eval_every
    return run.eval_set is not None and (
        run.step == run.total_steps or bool(every and run.step % every == 0))


# ---------------------------------------------------------------- the best checkpoint

def is_new_best(run: Run, m: dict) -> bool:
    """Record step metrics `m` in run.best_eval when its eval loss is the lowest so far."""
    loss = m.get("eval_loss")
    if loss is None or not math.isfinite(loss):
        return False
    best = run.best_eval
    if best is not None and loss >= best["eval_loss"]:
        return False
    run.best_eval = {"step": run.step, "eval_loss": loss, "eval_set": run.eval_set.identity}
    return True


def write_best(run: Run) -> None:
    """checkpoints/best := the step directory of run.best_eval (rank 0, atomically)."""
    tag = tag_for(run.best_eval["step"])
    on_rank0(run.dist, lambda: write_atomic(run.out / "checkpoints" / BEST,
                                            (tag + "\n").encode()))


def keep_best(run: Run, m: dict, epoch: int, elapsed: float, saved_at: int) -> int:
    """--save-best after an evaluated step: a new lowest eval loss is checkpointed (unless this
    step already is) and then named by `best`. Returns the step last saved."""
    if not run.args.save_best or "eval_loss" not in m or not is_new_best(run, m):
        return saved_at
    if saved_at != run.step:
        save_checkpoint(run, run.stream.state, epoch, elapsed)
        saved_at = run.step
    write_best(run)
    return saved_at


def best_after_resume(run: Run) -> None:
    """Point `best` at the best step the resumed checkpoint knew: a best of later steps (a
    branch abandoned by resuming an older checkpoint, or a stop before `best` was written) no
    longer describes this run, and those step directories will be overwritten."""
    if not run.args.save_best or run.best_eval is None:
        return
    path = run.out / "checkpoints" / tag_for(run.best_eval["step"])
    if run.eval_set is None or run.best_eval.get("eval_set") != run.eval_set.identity:
        log0(f"note: the best eval loss so far ({path}) was measured on another eval set (or "
             f"--eval-max-packs); `best` will name the next evaluated step")
        run.best_eval = None
    elif path.is_dir():
        write_best(run)
    else:
        log0(f"warning: the best checkpoint so far ({path}) is gone; `best` will name the next "
             f"lower eval loss")
        run.best_eval = None
