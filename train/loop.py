"""The training loop: set up, build, step, log, save; read top to bottom.

`train(args)`: `setup_distributed` (train.dist) -> `start_run` (train.setup.build: dataset, model,
engine; then resume from a checkpoint or start afresh) -> `run_steps` (`train_step` per optimizer
step, metrics, checkpoints every --save-every steps, a checkpoint and `Preempted` on SIGTERM) ->
`finish` (the last checkpoint's export and the closing line). Distributed start-up and stopping
are described in train.dist, checkpoints and resume in train.checkpoint, the test-only fault
points in train.hooks.

Exact loss
----------
Packed training must give the gradient of unpacked training of the same samples:

    grad = d/dθ [ sum of per-token CE over every label token of the optimizer step ] / N

where N counts the label tokens of the whole step (all ranks, all accumulation micro-steps). Per
micro-batch, `packed_loss` returns the summed CE `loss_sum`; we backward

    loss_sum * (grad_accum * world_size) / N

because DeepSpeed 0.19 (a) divides the loss given to `engine.backward` by
gradient_accumulation_steps (`scale_wrt_gas=True`, runtime/engine.py `backward`) and (b) averages
gradients over data-parallel ranks (ZeRO 0: engine `allreduce_bucket` multiplies by
1/dp_world_size; ZeRO 1/2: stage_1_and_2 `average_tensor`/`gradient_reduction_w_predivide`;
ZeRO 3: stage3 `__avg_scatter_contiguous_grads` divides by the averaging world size;
gradient_predivide_factor only moves where the same division happens). The two factors cancel and
the accumulated, reduced gradient is exactly d(sum CE)/N. tests/train/test_loop.py checks it against
HF's own loss (reduction sum / label tokens) on the same samples unpacked and padded (gradients
agree to ~4e-8), and 2 ranks x ZeRO 0-3 against 1 rank with the same global batch (losses to
~2e-7 over 8 steps).

Preference objectives (--objective dpo|simpo, train.preference) take the same path with pairs in
place of label tokens: N counts the pairs of the step (all ranks, all micro-steps; under
--sequence-parallel once per group), each micro-step backwards its summed pair loss times
(grad_accum * world_size) / N, so the gradient is that of the mean pair loss of the step; the
reward, accuracy and log-prob sums ride in the same reduction and the same host read.

The forward goes through the engine (`micro_loss`, `micro_pairs`, train.forward: why it must).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from pack.errors import PacktrainError
from pack.files import write_atomic
from train.checkpoint import (resume_point, restore_checkpoint, safe_deepspeed_loads,
                              save_checkpoint, tag_for, trim_metrics, write_run_files)
from train.data import MicroBatch
from train.dist import (DEFAULT_DIST_TIMEOUT, PREEMPTED_EXIT, PREEMPTED_FILE, Dist, Preempted,
                        StopRequest, all_reduce_sum, log0, on_rank0, setup_distributed,
                        sum_over_ranks, watch_launcher)
from train.evaluate import best_after_resume, eval_due, evaluate, keep_best, open_eval_set
from train.forward import micro_loss, micro_pairs
from train.hooks import Hooks
from train.mixture import local_counts, loss_sums, step_metrics
from train.preference import STATS, pair_metrics
from train.prefetch import device_batches, to_device
from train.run_config import write_run_config
from train.setup import Run, build
from train.tracking import Trackers

METRICS_FILE = "metrics.jsonl"  # OUTPUT/metrics.jsonl: one JSON line per step (rank 0)


def train(args: Namespace) -> dict:
    """Run training as configured by train-run's arguments; returns the closing summary."""
    dist = setup_distributed(float(getattr(args, "dist_timeout", DEFAULT_DIST_TIMEOUT)))
    watch_launcher()
    hooks = Hooks.from_env()  # a malformed test setting fails here, before any work
    run, checkpointed = start_run(args, dist, hooks)
    log0(f"training {run.total_steps} steps: {run.stream.num_packs} packs, "
         f"{run.stream.global_batch_packs} packs/step ({dist.world_size} rank(s) x "
         f"{args.grad_accum} accumulation x {args.micro_batch} packs/micro-batch), "
         f"{run.stream.steps_per_epoch} steps/epoch, ZeRO {args.zero}, {run.dtype}")
    last, elapsed = run_steps(run, checkpointed)
    return finish(run, last, elapsed)


# ---------------------------------------------------------------- start

def start_run(args: Namespace, dist: Dist, hooks: Hooks) -> tuple[Run, bool]:
    """Build the run and bring OUTPUT to its start: run files written, then the checkpoint
    restored (metrics.jsonl cut back to its step) or a fresh metrics.jsonl. Returns (run,
    whether OUTPUT already holds the checkpoint of the step it starts at)."""
    out = Path(args.output)
    resume_from = resume_point(args.resume, out)
    run = build(args, dist, hooks)
    run.eval_set = open_eval_set(args, run.manifest, run.model, dist, run.pref)
    safe_deepspeed_loads(run.engine)  # before any resume: DeepSpeed's own loads unpickle
    on_rank0(dist, lambda: write_run_files(run))
    on_rank0(dist, lambda: write_run_config(out, args))
    metrics_path = out / METRICS_FILE
    if resume_from is not None:
        run.stream.state = restore_checkpoint(run, resume_from)
        log0(f"resumed from {resume_from} at step {run.step}")
        best_after_resume(run)
        on_rank0(dist, lambda: trim_metrics(metrics_path, run.step))
    else:
        on_rank0(dist, lambda: metrics_path.unlink(missing_ok=True))
    on_rank0(dist, lambda: (out / PREEMPTED_FILE).unlink(missing_ok=True))
    hooks.start_pack_log()
    # a checkpoint resumed from another run's directory is not this run's: it saves its own
    here = resume_from is not None and \
        resume_from.resolve().parent == (out / "checkpoints").resolve()
    return run, here


# ---------------------------------------------------------------- the step

@dataclass
class StepResult:
    """One optimizer step, summed over all ranks: loss per label token, counts, norm, LR;
    `skipped` names why the update was skipped (--skip-nonfinite), else None."""

    loss: float
    label_tokens: int
    tokens: int
    grad_norm: float | None
    lr: float
    skipped: str | None = None
    per_dataset: dict = field(default_factory=dict)  # a mixture's loss/<name>, tokens/<name>, ...
    pairs: dict = field(default_factory=dict)  # a preference run's rewards/..., logps/..., pairs


def _local_grad_norm(engine: Any) -> torch.Tensor | None:
    """ZeRO-0 fp32 does not record the norm: compute it from .grad (full on every rank), before
    clipping, as the ZeRO optimizers report it. A float64 device tensor (read with the rest)."""
    # accumulate in float64: an fp32 norm over millions of elements is off by ~1e-5
    grads = [p.grad.detach() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    # one foreach kernel over all tensors, not a Python loop of kernels per parameter
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)))


def _read(parts: list[torch.Tensor | None]) -> list[float]:
    """THE host read of the step: every tensor (device scalars/vectors) concatenated, one copy."""
    device = next(p.device for p in parts if p is not None)  # the counts': the compute device
    flat = [p.detach().to(device, torch.float64).reshape(-1) for p in parts if p is not None]
    return torch.cat(flat).tolist()


def train_step(run: Run, micro_batches: list[MicroBatch],
               before_update: Callable[[Any], None] | None = None) -> StepResult:
    """One optimizer step over this rank's `grad_accum` micro-batches (see the module doc for
    the loss scaling). `before_update(engine)` runs after the last backward, before the update
    (tests read gradients there).

    Host reads (device-to-host syncs on CUDA), counted by tests/train/test_step_syncs.py: ONE in
    packtrain's code per step. Label/token counts, sample boundaries and the longest sample come
    from the packs on the host (collate); the loss scale is a device tensor from a device
    all-reduce of those counts; micro-batch i + 1 is copied while i computes (train.prefetch).
    The read: ZeRO 0 fp32 before the update (loss sum, counts, mixture sums, gradient norm:
    the torch optimizer has no overflow check, so a non-finite step must be known before it
    runs); otherwise after `engine.step()` (the same plus DeepSpeed's norm: its optimizers skip
    a non-finite update themselves, and `was_step_applied` is checked). DeepSpeed's overflow
    checks and transformers' packed-sequence detection make their own reads (the test states
    how many)."""
    engine, dist = run.engine, run.dist
    ga = engine.gradient_accumulation_steps()
    if len(micro_batches) != ga:
        raise RuntimeError(f"{len(micro_batches)} micro-batches for gradient_accumulation_steps {ga}")
    k = len(run.datasets)  # 0 unless a mixture: then per-dataset sums ride on the same reductions
    pref = run.pref  # a preference objective: the loss is a mean over pairs, not label tokens
    share = _pair_share(run)
    counts = _summed(torch.tensor(
        [sum(mb.num_label_tokens for mb in micro_batches) if pref is None
         else share * sum(mb.pairs for mb in micro_batches),
         sum(mb.num_tokens for mb in micro_batches), *local_counts(micro_batches, k),
         *([] if pref is None else [sum(mb.num_label_tokens for mb in micro_batches)])],
        dtype=torch.float64), dist)
    # a mixture's per-dataset CE sums, or a preference step's STATS sums (the loss apart)
    group_sums = loss_sums(k, dist.device) if pref is None else \
        torch.zeros(len(STATS) - 1, dtype=torch.float64, device=dist.device)
    scale = (ga * dist.world_size / counts[0].clamp(min=1)).float()
    lr = float(engine.optimizer.param_groups[0]["lr"]) if hasattr(engine.optimizer, "param_groups") \
        else float(engine.get_lr()[0])
    loss_sum_local = torch.zeros((), dtype=torch.float64, device=dist.device)
    grad_norm = skipped = vals = None
    zero0_fp32 = engine.zero_optimization_stage() == 0 and run.dtype == "fp32"
    for i, mb in enumerate(device_batches(micro_batches, dist.device)):
        if pref is None:
            loss_sum, _ = micro_loss(engine, mb, run.args.loss_chunk, group_sums)
        else:
            loss_sum, stats = micro_pairs(engine, mb, run.args.loss_chunk, pref, run.sp)
            group_sums += stats[1:] * share
        engine.backward(loss_sum * scale)
        loss_sum_local += loss_sum.detach().double() * share
        if i == len(micro_batches) - 1:
            if before_update is not None:
                before_update(engine)
            sums = _summed(torch.cat([loss_sum_local.reshape(1),
                                      *([] if group_sums is None else [group_sums])]), dist)
            if zero0_fp32:
                # before the update, so that a non-finite loss never reaches the weights
                vals = _read([counts, sums, _local_grad_norm(engine)])
                grad_norm = vals[len(counts) + len(sums)] if len(vals) > len(counts) + len(sums) \
                    else None
                skipped = _nonfinite(run, vals[len(counts)], grad_norm)
                if skipped:
                    _skip_torch_update(engine)
        engine.step()
    if zero0_fp32:
        _end_torch_skip(engine)
    else:
        gn = engine.get_global_grad_norm()
        vals = _read([counts, sums, gn if torch.is_tensor(gn) else None])
        grad_norm = vals[len(counts) + len(sums)] if torch.is_tensor(gn) else \
            (None if gn is None else float(gn))
        skipped = _nonfinite(run, vals[len(counts)], 0.0)
    n_total, tokens_total = int(vals[0]), int(vals[1])
    loss_sum_total, mix_counts = vals[len(counts)], vals[2:len(counts)]
    mix_sums = vals[len(counts) + 1:len(counts) + len(sums)]
    pairs = {}
    if pref is not None:  # n_total counts pairs; the label tokens ride last in counts
        pairs = pair_metrics([loss_sum_total, *mix_sums], n_total)
        del pairs["loss"]
        n_labels = int(vals[len(counts) - 1])
        mix_counts = mix_sums = []
    if skipped is None:
        # global, so every rank takes the same branch (ZeRO 0 fp32's norm is per rank)
        skipped = _nonfinite(run, 0.0, grad_norm)
    if skipped is not None and engine.was_step_applied():
        raise PacktrainError(f"step {run.step + 1}: the {skipped} but the update was applied "
                             f"(the DeepSpeed config turns off its overflow check?); stopped "
                             f"before saving this step{_last_good(run)}")
    if skipped is not None:
        run.skipped_steps += 1
        log0(f"warning: step {run.step + 1} skipped: the {skipped} "
             f"({run.skipped_steps} of --skip-nonfinite {run.args.skip_nonfinite})")
    return StepResult(loss=loss_sum_total / max(n_total, 1),
                      label_tokens=n_total if pref is None else n_labels,
                      tokens=tokens_total, grad_norm=grad_norm, lr=lr, skipped=skipped,
                      per_dataset=step_metrics([d["name"] for d in run.datasets], mix_counts,
                                               mix_sums) if k else {}, pairs=pairs)


def _pair_share(run: Run) -> float:
    """The weight of this rank's pairs in the step's sums: under --sequence-parallel every rank
    of a group computes the same pairs' loss (from the group's summed log-probs), so only the
    group's first rank counts them; 1 otherwise."""
    return 0.0 if run.pref is not None and run.sp is not None and run.sp.rank else 1.0


def _summed(t: torch.Tensor, dist: Any) -> torch.Tensor:
    """`t` (host or device) on the device, summed over all ranks; nothing read back."""
    return sum_over_ranks(to_device(t, dist.device) if t.device != dist.device else t)


def _nonfinite(run: Run, loss_sum: float, grad_norm: float | None) -> str | None:
    """None when the loss and the gradient norm are finite. Otherwise what is not finite, when
    --skip-nonfinite allows one more skipped step; else stop the run in one line, without a
    checkpoint of this step: training on would only write non-finite weights."""
    for what, value in (("loss", loss_sum), ("gradient norm", grad_norm)):
        if value is None or math.isfinite(value):
            continue
        if run.skipped_steps < run.args.skip_nonfinite:
            return f"{what} is {value}"
        allowed = f" after {run.skipped_steps} skipped step(s)" if run.args.skip_nonfinite else ""
        raise PacktrainError(f"step {run.step + 1}: the {what} is {value} (not finite){allowed}; "
                             f"stopped before saving this step{_last_good(run)}. Lower --lr, "
                             f"check --grad-clip and --weight-decay, try --dtype fp32, or skip "
                             f"such steps with --skip-nonfinite N")
    return None


def _last_good(run: Run) -> str:
    latest = run.out / "checkpoints" / "latest"
    return f"; the last good checkpoint is {latest.read_text().strip()}" if latest.is_file() \
        else "; no checkpoint was written"


def _skip_torch_update(engine: Any) -> None:
    """ZeRO 0 fp32 steps a plain torch optimizer, which has no overflow check: make its next
    step a no-op (weights and moments untouched; the engine still clears the gradients) and
    raise DeepSpeed's overflow flag, so the engine skips the LR schedule and reports the step as
    not applied, exactly as its own optimizers do for a non-finite gradient norm."""
    engine.optimizer.step = lambda *args, **kwargs: None
    engine.optimizer.overflow = True


def _end_torch_skip(engine: Any) -> None:
    engine.optimizer.__dict__.pop("step", None)
    engine.optimizer.__dict__.pop("overflow", None)


# ---------------------------------------------------------------- the loop

def run_steps(run: Run, checkpointed: bool) -> tuple[dict | None, float]:
    """Train from run.step to run.total_steps; returns the last step's metrics and the elapsed
    seconds (including those before a resume). Saves every --save-every steps and at the end;
    on SIGTERM (any rank) saves and raises Preempted."""
    args, dist = run.args, run.dist
    progress = Progress(run)
    t_start = time.perf_counter()
    last = None
    epoch = run.stream.state.epoch
    saved_at = run.step if checkpointed else -1
    stop = StopRequest().__enter__()
    sleep_s = run.hooks.step_sleep
    try:
        if run.eval_set is not None and run.step == 0:  # a fresh run: the loss before training
            progress.log({"step": 0, "epoch": epoch, **evaluate(run)}, t_start)
        while run.step < run.total_steps:
            if sleep_s:
                time.sleep(sleep_s)
            t0 = time.perf_counter()
            micro_batches, epoch = run.stream.next_step()
            res = train_step(run, micro_batches)
            dt = time.perf_counter() - t0
            run.step += 1
            run.tokens_seen += res.tokens
            run.label_tokens_seen += res.label_tokens
            elapsed = run.elapsed_before + time.perf_counter() - t_start
            last = {"step": run.step, "epoch": epoch, "loss": res.loss, "lr": res.lr,
                    "grad_norm": res.grad_norm, "tokens": res.tokens,
                    "label_tokens": res.label_tokens, "tokens_per_s": res.tokens / dt,
                    "elapsed_s": round(elapsed, 3), **res.per_dataset, **res.pairs}
            if res.skipped:  # metrics.jsonl stays JSON: no NaN or Infinity in it
                last.update({k: None for k in last
                             if k == "loss" or k.startswith(("loss/", "rewards/", "logps/"))},
                            grad_norm=None, skipped=res.skipped)
            if eval_due(run):
                last.update(evaluate(run))
            run.hooks.log_packs(run.step, epoch, dist.rank, [mb.pack_ids for mb in micro_batches])
            progress.log(last, t_start)
            run.hooks.fault("kill-after-step", run.step, dist.rank)
            run.hooks.fault("stop-after-step", run.step, dist.rank)
            saved_at = keep_best(run, last, epoch, elapsed, saved_at)
            # every rank must take the same branch: agree on "any rank was signalled"
            if all_reduce_sum([float(stop.requested)], dist.device)[0] > 0:
                if saved_at != run.step:
                    save_checkpoint(run, run.stream.state, epoch, elapsed)
                    saved_at = run.step
                _preempted(run, stop.signame)
            if args.save_every and run.step % args.save_every == 0 and run.step < run.total_steps \
                    and saved_at != run.step:
                save_checkpoint(run, run.stream.state, epoch, elapsed)
                saved_at = run.step
        elapsed = run.elapsed_before + time.perf_counter() - t_start
        if saved_at != run.step:
            save_checkpoint(run, run.stream.state, epoch, elapsed)
        # a signal that came during the final checkpoint: it is complete, skip the export
        if all_reduce_sum([float(stop.requested)], dist.device)[0] > 0:
            _preempted(run, stop.signame)
    finally:
        stop.release()  # from here a SIGTERM terminates at once: the checkpoint is complete
        progress.close()
    return last, elapsed


class Progress:
    """Rank 0's record of the steps: a line per step in metrics.jsonl; a live bar on a terminal,
    plain "step N/M ..." lines every --log-every steps otherwise. Both show the time left (the
    bar's is tqdm's) and the last evaluation's loss until the next one."""

    def __init__(self, run: Run) -> None:
        from tqdm import tqdm

        self.run = run
        self.trackers = Trackers(run) if run.dist.is_main else None  # --report-to
        self.interactive = sys.stderr.isatty()
        self.bar = tqdm(total=run.total_steps, initial=run.step,
                        disable=not (run.dist.is_main and self.interactive),
                        desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
        self.steps_at_start = run.step
        self.metrics = open(run.out / METRICS_FILE, "a") if run.dist.is_main else None
        self.last_eval: tuple[int, float] | None = None  # (step, eval loss) of the last one

    def log(self, m: dict, t_start: float) -> None:
        """Record step metrics `m`; `t_start`: perf_counter() at this process's first step."""
        run = self.run
        if self.metrics is None:
            return
        self.metrics.write(json.dumps(m) + "\n")
        self.metrics.flush()
        self.trackers.log(m)
        self.bar.update(m["step"] - self.bar.n)  # 0 for the step-0 evaluation
        fresh = m.get("eval_loss") is not None
        if fresh:
            self.last_eval = (m["step"], m["eval_loss"])
        ev = {} if self.last_eval is None else {"eval_loss": f"{self.last_eval[1]:.4f}"}
        if "loss" not in m:  # the step-0 evaluation
            if self.interactive:
                self.bar.set_postfix(eval_loss=ev.get("eval_loss", "n/a"), refresh=False)
            else:
                print(f"step 0/{run.total_steps}{self._eval_text()}", file=sys.stderr, flush=True)
            return
        if fresh or run.step % run.args.log_every == 0 or run.step == run.total_steps:
            loss = "skipped" if m["loss"] is None else f"{m['loss']:.4f}"
            pairs = _pair_text(m)
            self.bar.set_postfix(loss=loss, **{k: f"{v:.3f}" for k, v in pairs.items()},
                                 lr=f"{m['lr']:.2e}", tok_s=f"{m['tokens_per_s']:,.0f}", **ev,
                                 refresh=False)
            if not self.interactive:
                from tqdm import tqdm

                left = (run.total_steps - run.step) * (time.perf_counter() - t_start) \
                    / max(1, run.step - self.steps_at_start)
                shown = "".join(f" {k} {v:.3f}" for k, v in pairs.items())
                print(f"step {run.step}/{run.total_steps} loss {loss}{shown}{self._eval_text()} "
                      f"lr {m['lr']:.3e} tokens/s {m['tokens_per_s']:,.0f} "
                      f"eta {tqdm.format_interval(left)}", file=sys.stderr, flush=True)

    def _eval_text(self) -> str:
        """' eval_loss L' of the last evaluation, with its step when it was not this one."""
        if self.last_eval is None:
            return ""
        step, loss = self.last_eval
        return f" eval_loss {loss:.4f}" + ("" if step == self.run.step else f" (step {step})")

    def close(self) -> None:
        self.bar.close()
        if self.trackers is not None:
            self.trackers.close()
        if self.metrics is not None:
            self.metrics.close()


def _pair_text(m: dict) -> dict:
    """A preference step's reward margin and accuracy for the console (none for SFT or a
    skipped step)."""
    if m.get("rewards/margin") is None:
        return {}
    return {"margin": m["rewards/margin"], "acc": m["rewards/accuracy"]}


def _preempted(run: Run, signame: str) -> None:
    """Record the stop (OUTPUT/preempted.json, rank 0) and raise Preempted on every rank."""
    ckpt = run.out / "checkpoints" / tag_for(run.step)
    info = {"step": run.step, "checkpoint": str(ckpt), "signal": signame,
            "exit_code": PREEMPTED_EXIT, "launch_id": os.environ.get("PACKTRAIN_LAUNCH_ID"),
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    on_rank0(run.dist, lambda: write_atomic(run.out / PREEMPTED_FILE,
                                            (json.dumps(info, indent=2) + "\n").encode()))
    raise Preempted(run.step, ckpt, signame)


# ---------------------------------------------------------------- the end

def finish(run: Run, last: dict | None, elapsed: float) -> dict:
    """Release the engine, export the last checkpoint (--export), print the closing line on rank
    0; returns the summary."""
    args, dist, out = run.args, run.dist, run.out
    tag = tag_for(run.step)
    summary = {"steps": run.step, "tokens": run.tokens_seen, "label_tokens": run.label_tokens_seen,
               "elapsed_s": round(elapsed, 2),
               "tokens_per_s": run.tokens_seen / elapsed if elapsed > 0 else None,
               "final_loss": last["loss"] if last else None,
               "skipped_steps": run.skipped_steps,
               "eval_loss": last.get("eval_loss") if last else None, "best_eval": run.best_eval,
               "checkpoint": str(out / "checkpoints" / tag)}
    # Release the engine and the ZeRO-3 config: with HfDeepSpeedConfig alive, a model built by
    # the export would be partitioned with collectives that only rank 0 enters (a hang).
    run.engine = run.model = run.keep_alive = None
    if run.pref is not None:  # a live reference model (and its ZeRO-3 engine) goes too
        run.pref.ref_model = run.pref.ref_engine = None
    _unset_hf_deepspeed_config()
    if args.export:
        summary["export"] = on_rank0(
            dist, lambda: _export(out / "checkpoints" / tag, out / "export"))
    if dist.is_main:
        loss = f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "n/a"
        tps = f"{summary['tokens_per_s']:,.0f}" if summary["tokens_per_s"] else "n/a"
        print(f"done: {run.step} steps, {run.tokens_seen:,} tokens ({run.label_tokens_seen:,} "
              f"label tokens) in {elapsed:.1f}s, {tps} tokens/s, final loss {loss}"
              + (f", eval loss {summary['eval_loss']:.4f}" if summary["eval_loss"] is not None
                 else "") + "; "
              f"checkpoint {summary['checkpoint']}"
              + (f"; {run.skipped_steps} step(s) skipped (non-finite)" if run.skipped_steps else "")
              + (f"; export {summary['export']}" if summary.get("export") else ""), flush=True)
    return summary


def _unset_hf_deepspeed_config() -> None:
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    except ImportError:  # pragma: no cover
        return
    unset_hf_deepspeed_config()


def _export(checkpoint: Path, out_dir: Path) -> str | None:
    if importlib.util.find_spec("train.export") is None:
        print("note: train.export is not available; skipping --export", flush=True)
        return None
    from train.export import export_checkpoint

    return str(export_checkpoint(checkpoint, out_dir, merge=False))
