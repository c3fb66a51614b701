"""Command lines: train-run and train-export.

    train-run --shards DATA [--model MODEL] [--output runs/NAME] [--nproc N] [options]
    train-export CHECKPOINT OUT [--merge] [--dtype float32|bfloat16|float16]

User errors (PacktrainError and bad attention choices) print one line `error: ...` on stderr and
exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

from pack.format import PacktrainError


def run_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="train-run",
        description="Train a Hugging Face causal LM on a packed dataset (pack-build output) with "
                    "variable-length attention and DeepSpeed ZeRO 0-3.")
    g = ap.add_argument_group("data and model")
    g.add_argument("--shards", required=True, help="packed dataset directory (has manifest.json)")
    g.add_argument("--model", help="local HF model directory (default: the dataset's tokenizer "
                                   "path from its manifest)")
    g.add_argument("--output", help="run directory (default: runs/<dataset directory name>)")
    g.add_argument("--verify", action="store_true",
                   help="check every shard's sha256 and every pack invariant before training")
    g.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="train even if the model's tokenizer differs from the dataset's")
    g = ap.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (whichever of --epochs and "
                        "--max-steps ends first)")
    g.add_argument("--lr", type=float, default=2e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--micro-batch", type=int, default=1,
                   help="packs concatenated into one row per micro-step")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-steps per optimizer step on each rank")
    g.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("engine")
    g.add_argument("--nproc", type=int, default=1,
                   help="local ranks to launch (uses torch.distributed.run); leave 1 under an "
                        "external launcher (torchrun, deepspeed, srun)")
    g.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=2)
    g.add_argument("--offload", choices=("none", "optimizer", "param"), default="none")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="auto: bf16 on GPUs that support it, fp32 otherwise")
    g.add_argument("--attn", choices=("auto", "flash", "torch", "sdpa"), default="auto",
                   help="packed attention backend (auto: flash, then torch varlen on CUDA; "
                        "per-sample SDPA on CPU)")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--loss-chunk", type=int, default=1024,
                   help="label tokens per chunk of the chunked cross-entropy")
    g.add_argument("--deepspeed", metavar="CONFIG.json",
                   help="DeepSpeed config merged over the generated one")
    g = ap.add_argument_group("LoRA")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) only")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=32)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--lora-targets", default="all-linear",
                   help="comma-separated module names, or all-linear")
    g = ap.add_argument_group("checkpoints and logging")
    g.add_argument("--save-every", type=int, default=0,
                   help="checkpoint every N optimizer steps (always at the end)")
    g.add_argument("--resume", metavar="auto|PATH",
                   help="auto: continue from OUTPUT/checkpoints/latest if it exists; PATH: a "
                        "checkpoint step directory or run directory")
    g.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                   help="write a Hugging Face model to OUTPUT/export at the end")
    g.add_argument("--log-every", type=int, default=1,
                   help="progress-bar/console update interval in steps (metrics.jsonl gets "
                        "every step)")
    return ap


def parse_run_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = run_parser().parse_args(argv)
    if args.output is None:
        args.output = str(Path("runs") / Path(os.path.abspath(args.shards)).name)
    for name in ("epochs", "micro_batch", "grad_accum", "nproc", "log_every", "loss_chunk"):
        if getattr(args, name) < 1:
            raise PacktrainError(f"--{name.replace('_', '-')} must be >= 1")
    if args.save_every < 0 or args.warmup_steps < 0:
        raise PacktrainError("--save-every and --warmup-steps must be >= 0")
    return args


def _user_error(e: Exception) -> int:
    rank = int(os.environ.get("RANK", "0"))
    where = f" (rank {rank})" if rank else ""
    msg = " ".join(str(e).split()) or type(e).__name__
    print(f"error{where}: {msg}", file=sys.stderr, flush=True)
    return 2


def run_main(argv: list[str] | None = None) -> int:
    from train.launch import in_launched_rank, launch_local

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_run_args(argv)
        from pack.format import read_manifest

        read_manifest(args.shards)  # fail fast, in the parent, before any rank starts
        if args.nproc > 1 and not in_launched_rank():
            return launch_local(args.nproc, argv)
        from train.attention import AttentionBackendError
        from train.loop import train

        try:
            train(args)
        except AttentionBackendError as e:
            raise PacktrainError(str(e)) from None
    except PacktrainError as e:
        return _user_error(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def export_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="train-export",
        description="Convert a train-run checkpoint (OUTPUT/checkpoints/step-N) into a Hugging "
                    "Face model directory.")
    ap.add_argument("checkpoint", help="a run OUTPUT directory (its latest checkpoint), its "
                                       "checkpoints/ directory, or one step directory such as "
                                       "runs/x/checkpoints/step-00000100")
    ap.add_argument("out", help="output model directory")
    ap.add_argument("--merge", action="store_true",
                    help="LoRA runs: merge the adapters into the base weights")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="weights' dtype (default: the original model's, from its config)")
    args = ap.parse_args(argv)
    try:
        if importlib.util.find_spec("train.export") is None:
            raise PacktrainError("train.export is not available in this installation")
        from train.export import export_checkpoint

        path = export_checkpoint(Path(args.checkpoint), Path(args.out), merge=args.merge,
                                 dtype=args.dtype)
        info_file = Path(path) / "packtrain_export.json"
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        print(f"exported {info.get('kind', 'model')} from {args.checkpoint} to {path}")
        for w in info.get("warnings", []):
            print(f"warning: {w}", file=sys.stderr)
    except PacktrainError as e:
        return _user_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(run_main())
