"""pack-ref: a reference model's log-probs of every segment of a preference dataset, computed once
offline and stored beside the packs, so DPO training skips the reference forward.

    pack-ref MODEL DATASET [--dtype fp32|bf16] [--zero 0-3] [--attn auto|flash|torch|sdpa] [--nproc N]

For every pack, in one forward with the same varlen attention train-run uses (every segment sees
only itself), `train.preference.segment_logps` gives per segment the sum over its label positions
t of log p(input_ids[t] | the segment before t), under no_grad. The values go to the sidecar
`DATASET/reference/<fingerprint[:16]>/shard-NNNNN.arrow` (one per data shard, written through
`pack.reference.ReferenceWriter`: temp name + rename), and once every sidecar shard exists rank 0
adds the manifest entry (`reference_logps`, keyed by the model's fingerprint). Resumable: a rerun
after an interruption skips the sidecar shards already written.

Ranks (torchrun, --nproc N, srun): the packs of each shard are dealt to the ranks (pack j of a shard
to rank j mod N), the values gathered on rank 0, which writes the shard; every rank runs the same
number of forwards (a rank with fewer packs repeats one and discards it), as ZeRO-3 needs: its
forward gathers partitioned parameters with collectives. --zero 3 loads the model partitioned
(HfDeepSpeedConfig) and forwards through a DeepSpeed inference engine; 0-2 keep whole weights on
every rank (they shard only optimizer state and gradients, which inference has none of).

Refused in one line (exit 2): a missing or broken dataset, an SFT (non-preference) dataset, a model
directory without weights, a model whose tokenizer is not the dataset's.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np

from pack.errors import PacktrainError


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pack-ref",
        description="Store a reference model's per-segment log-probs beside a preference dataset "
                    "(pack-build output), for train-run --objective dpo.")
    ap.add_argument("model", help="local Hugging Face model directory (the DPO reference)")
    ap.add_argument("dataset", help="preference dataset directory (manifest kind preference)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="compute dtype of the reference forward (default fp32)")
    ap.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0,
                    help="3: load the model partitioned over the ranks (DeepSpeed ZeRO-3); 0-2 "
                         "keep whole weights on every rank")
    ap.add_argument("--deepspeed", metavar="CONFIG.json",
                    help="DeepSpeed config merged over the generated one (as train-run's)")
    ap.add_argument("--attn", choices=("auto", "flash", "torch", "sdpa"), default="auto",
                    help="packed attention backend, as train-run --attn")
    ap.add_argument("--nproc", type=int, default=1,
                    help="local ranks to launch (torchrun); leave 1 under an external launcher")
    ap.add_argument("--loss-chunk", type=int, default=1024,
                    help="label tokens per chunk of the head (bounds the logits' memory)")
    ap.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                    help="sha256 every data shard first (default on)")
    ap.add_argument("--allow-tokenizer-mismatch", action="store_true",
                    help="compute even if the model's tokenizer differs from the dataset's")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def check_inputs(args: Namespace) -> dict:
    """The refusals that need no model weights loaded: the dataset (exists, is a preference
    dataset), the model directory, its tokenizer against the dataset's, the numbers. Returns the
    manifest. Cheap: run before any rank starts."""
    from pack.format import is_preference, read_manifest
    from train.checks import check_tokenizer

    if args.nproc < 1 or args.loss_chunk < 1:
        raise PacktrainError("--nproc and --loss-chunk must be >= 1")
    manifest = read_manifest(args.dataset)
    if not is_preference(manifest):
        raise PacktrainError(f"{args.dataset}: not a preference dataset (kind "
                             f"{manifest.get('kind', 'sft')}); pack-ref stores reference log-probs "
                             f"of chosen/rejected pairs: pack-build a preference dataset first")
    if not Path(args.model).is_dir():
        raise PacktrainError(f"{args.model}: no such model directory; give a local Hugging Face "
                             f"model directory")
    for w in check_tokenizer(args.dataset, manifest, args.model, args.allow_tokenizer_mismatch):
        print(f"warning: {w}", file=sys.stderr)
    return manifest


# ---------------------------------------------------------------- the model

def load_reference(args: Namespace, dist: Any, manifest: dict) -> tuple[Any, Any, Any]:
    """(callable pack -> per-segment log-probs, the model, keep_alive): loaded as train-run loads
    it (train.setup.load_model, attention backend registration), checked as train-run checks it
    (rank 0: tokenizer fingerprint, token ids, shards), in eval mode."""
    from train.attention import enable_packed_attention, select_backend
    from train.config import DTYPES, build_ds_config
    from train.setup import load_model, preflight_checks

    opts = Namespace(zero=args.zero, offload="none", grad_accum=1, grad_clip=1.0,
                     deepspeed=args.deepspeed,
                     allow_new_weights=False, gradient_checkpointing=False, lora=False,
                     allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
    ds_config = build_ds_config(opts, args.dtype, dist.device)
    model, keep_alive = load_model(opts, args.model, args.dtype, ds_config)
    enable_packed_attention(model, select_backend(args.attn, dist.device, DTYPES[args.dtype]))
    preflight_checks(opts, args.dataset, manifest, model, args.model, dist, args.verify)
    engine = None
    if args.zero == 3:
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    else:
        model.to(dist.device)
    model.eval()
    return _forward(engine, model, args.loss_chunk, dist.device), model, keep_alive


def _forward(engine: Any, model: Any, chunk: int, device: Any):
    import torch

    from train.data import collate
    from train.forward import packed_forward
    from train.preference import segment_logps

    def logps(pack: dict) -> np.ndarray:
        mb = collate([pack]).to(device)

        def fn():
            return segment_logps(model, mb.input_ids, mb.labels, mb.position_ids, mb.cu_seqlens,
                                 bounds=mb.bounds, max_seqlen=mb.max_seqlen, chunk_size=chunk,
                                 label_count=mb.label_tokens)
        with torch.no_grad():
            if engine is None:
                out = fn()
            else:  # ZeRO-3 gathers parameters in the engine's module hooks
                with packed_forward(model, fn):
                    out = engine()
        return out.detach().to("cpu", torch.float64).numpy()
    return logps


# ---------------------------------------------------------------- the work

def shards_to_do(writer: Any, n_shards: int, dist: Any) -> list[int]:
    """Rank 0's list of sidecar shards not finished by an earlier run, the same on every rank."""
    todo = [s for s in range(n_shards) if not writer.done(s)] if dist.is_main else None
    return broadcast(todo, dist)


def broadcast(obj: Any, dist: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    import torch.distributed as tdist

    if dist.world_size == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, dist: Any) -> list[Any]:
    import torch.distributed as tdist

    if dist.world_size == 1:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, obj)
    return out


def compute_shard(ds: Any, s: int, logps, dist: Any, even: bool, tick) -> list[np.ndarray] | None:
    """Sidecar rows of data shard `s` (on rank 0; None elsewhere): pack j on rank j mod N. With
    `even`, every rank runs ceil(packs / N) forwards (ZeRO-3's collectives need it)."""
    from train.data import checked_pack

    start, n = int(ds.offsets[s]), int(ds.offsets[s + 1] - ds.offsets[s])
    mine = list(range(dist.rank, n, dist.world_size))
    rounds = math.ceil(n / dist.world_size) if even else len(mine)
    values = {}
    for k in range(rounds):
        j = mine[k] if k < len(mine) else (mine[-1] if mine else 0)
        v = logps(checked_pack(ds, start + j))
        if k < len(mine):
            values[j] = v
        tick(min(dist.world_size, n - k * dist.world_size))  # real packs of all ranks
    parts = gather(values, dist)
    if not dist.is_main:
        return None
    rows = {j: v for part in parts for j, v in part.items()}
    return [rows[j] for j in range(n)]


def run(args: Namespace, dist: Any, hooks: Any, fingerprint: str | None = None) -> dict:
    """Compute and store the sidecar; returns the summary counts (rank 0's are complete).
    `fingerprint`: the model's, when the caller computed it already (one process)."""
    from pack.format import PackedDataset, read_manifest
    from pack.reference import ReferenceWriter, model_fingerprint
    from train.dist import barrier, on_rank0

    manifest = read_manifest(args.dataset)
    fingerprint = fingerprint or broadcast(on_rank0(dist, lambda: model_fingerprint(args.model)), dist)
    ds = PackedDataset(args.dataset, manifest)
    writer = ReferenceWriter(args.dataset, args.model, fingerprint, args.dtype) if dist.is_main else None
    todo = shards_to_do(writer, len(ds.shards), dist)
    stats = {"packs": 0, "segments": 0, "tokens": 0, "shards_done": 0,
             "shards_reused": len(ds.shards) - len(todo), "fingerprint": fingerprint}
    t0 = time.perf_counter()
    if todo:  # a finished earlier run needs no model: only the manifest entry, if it lacks it
        logps, model, keep_alive = load_reference(args, dist, manifest)
        t0 = time.perf_counter()  # the summary's rate is the forwards' (loading is start-up)
        bar = _bar(sum(int(ds.shards[s]["packs"]) for s in todo), args.quiet or not dist.is_main)
        for k, s in enumerate(todo):
            rows = compute_shard(ds, s, logps, dist, args.zero == 3, bar.update)
            if dist.is_main:
                writer.write_shard(s, rows)
                stats["packs"] += len(rows)
                stats["segments"] += sum(len(r) for r in rows)
                stats["tokens"] += int(ds.shards[s].get("tokens", 0))
                stats["shards_done"] += 1
                rate = stats["tokens"] / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
            hooks.fault("kill-after-shard", k + 1, dist.rank)  # tests: an interrupted run
        bar.close()
        del model, keep_alive
    barrier()
    if dist.is_main:
        writer.commit()
    barrier()
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _bar(total: int, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="pack-ref", unit="pack", disable=disable, file=sys.stderr,
                dynamic_ncols=True)


def summary(args: Namespace, stats: dict) -> str:
    rate = stats["tokens"] / stats["seconds"] if stats["seconds"] > 0 and stats["tokens"] else 0.0
    return (f"pack-ref: {args.model} -> {Path(args.dataset) / 'reference' / stats['fingerprint'][:16]}: "
            f"{stats['packs']:,} packs, {stats['segments']:,} segments in {stats['seconds']:.1f}s "
            f"({rate:,.0f} tokens/s); {stats['shards_done']} shard(s) computed, "
            f"{stats['shards_reused']} reused from an earlier run")


def main(argv: list[str] | None = None) -> int:
    """The pack-ref console script. Exit codes as train-run's: 0 done, 1 lost peers, 2 user error,
    130 interrupted."""
    from train.cli import command_exit

    argv = list(sys.argv[1:] if argv is None else argv)
    return command_exit(lambda: _main(argv))


def _main(argv: list[str]) -> int:
    from train.cli import rank_exit

    args = parser().parse_args(argv)
    check_inputs(args)  # fail fast, in the parent, before any rank starts
    from pack.reference import model_fingerprint
    from train.launch import in_launched_rank, launch_local

    launched = in_launched_rank()
    if args.nproc > 1 and not launched:
        return launch_local(args.nproc, argv, module="train.pack_ref")
    # one process: hash the weights here, before the slow imports (a directory without
    # weights is refused at once); ranks of a launch leave it to rank 0
    fingerprint = None if launched else model_fingerprint(args.model)
    from train.dist import log0, setup_distributed
    from train.hooks import Hooks

    hooks = Hooks.from_env()
    dist = setup_distributed()
    return rank_exit(lambda: log0(summary(args, run(args, dist, hooks, fingerprint))))


if __name__ == "__main__":
    sys.exit(main())
