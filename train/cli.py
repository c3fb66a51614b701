"""Command lines: train-run and train-export.

    train-run --shards DATA [--model MODEL] [--output runs/NAME] [--nproc N] [options]
    train-export CHECKPOINT OUT [--merge] [--dtype float32|bfloat16|float16]

Exit codes of train-run (one line on stderr for each non-zero one, no traceback):
  0   done
  1   a rank lost its peers (one died or hangs: --dist-timeout), or another failure
  2   user error (PacktrainError, bad attention choice)
  75  preempted: SIGTERM made every rank write a checkpoint and stop; rerun with --resume auto
  130 interrupted (Ctrl-C)
  143 the launcher got SIGTERM but its ranks stopped without writing a checkpoint
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import signal
import sys
from pathlib import Path
from typing import Callable

from pack.cli_config import add_config_arg, expand_config
from pack.errors import PacktrainError
from train.run_config import run_config
from train.tracking import add_tracking_args, check_installed


def add_objective_args(ap: argparse.ArgumentParser) -> None:
    """train-run's options for what is trained: the objective (SFT, DPO, SimPO) and LoRA/QLoRA."""
    g = ap.add_argument_group("objective")
    g.add_argument("--objective", choices=("sft", "dpo", "simpo"), default="sft",
                   help="sft: next-token loss over label tokens (SFT datasets); dpo / simpo: "
                        "preference pairs (datasets packed from chosen/rejected pairs)")
    g.add_argument("--beta", type=float, default=None,
                   help="dpo / simpo: the reward scale beta (default: dpo 0.1, simpo 2.0)")
    g.add_argument("--simpo-gamma", type=float, default=None,
                   help="simpo: the target reward margin gamma (default 0.5)")
    g.add_argument("--ref-model", metavar="PATH", default=None,
                   help="dpo: the reference model (default: --model; under --lora the frozen "
                        "base, with the adapters disabled)")
    g.add_argument("--ref-logps", choices=("auto", "stored", "live"), default=None,
                   help="dpo: reference log-probs from pack-ref's sidecar (stored) or a "
                        "reference forward every step (live); auto (default): stored when the "
                        "dataset has them for the reference model")
    g = ap.add_argument_group("LoRA")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) only")
    g.add_argument("--qlora", action="store_true",
                   help="QLoRA: load the base as bitsandbytes NF4 (double quantisation, compute "
                        "dtype from --dtype) and train LoRA adapters on it; implies --lora "
                        "(needs packtrain[qlora])")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=32)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--lora-targets", default="all-linear",
                   help="comma-separated module names, or all-linear")


def run_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="train-run",
        description="Train a Hugging Face causal LM on a packed dataset (pack-build output) with "
                    "variable-length attention and DeepSpeed ZeRO 0-3.")
    g = ap.add_argument_group("data and model")
    g.add_argument("--shards", action="append", help="packed dataset directory (has "
                   "manifest.json) or URL (s3://, gs://, ...: streamed); repeat it to train on a "
                   "mixture of datasets (see --mix)")
    g.add_argument("--mix", metavar="W1,W2,...|FILE",
                   help="mixture weights, one per --shards: each dataset's share of an epoch's "
                        "tokens (default: proportional to their tokens); or a .json/.yaml file "
                        "listing {path, weight} entries instead of --shards")
    g.add_argument("--cache-dir", metavar="DIR", help="where shards fetched from a --shards URL "
                   "are cached (default: $PACKTRAIN_CACHE or ~/.cache/packtrain)")
    g.add_argument("--model", help="local HF model directory (default: the dataset's tokenizer "
                                   "path from its manifest)")
    g.add_argument("--output", help="run directory (default: runs/<dataset directory name>)")
    g.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="check every shard's sha256 before training (default: on for a local "
                        "dataset, so a flipped byte is never trained on; for a --shards URL "
                        "each shard is checked as it arrives, and --verify fetches and checks "
                        "all of them first). Sizes, row counts and every pack invariant are "
                        "always checked")
    g.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="train even if the model's tokenizer differs from the dataset's")
    g.add_argument("--allow-new-weights", action="store_true",
                   help="train even if the model directory lacks some weights (they start "
                        "from random values)")
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
    g.add_argument("--skip-nonfinite", type=int, default=0, metavar="N",
                   help="skip (no update, no LR schedule step) up to N optimizer steps whose loss "
                        "or gradient norm is NaN or infinite, as DeepSpeed's fp16 loss scaler "
                        "does; the next one stops the run (default 0: stop at the first)")
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
    g.add_argument("--kernels", choices=("auto", "none", "liger", "liger-flce"), default="auto",
                   help="fused kernels: liger = liger-kernel's RMSNorm, RoPE and SwiGLU; "
                        "liger-flce = those and its fused linear cross-entropy as the loss; "
                        "auto: liger where it imports on CUDA, else none")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer (dynamic shapes; the varlen attention "
                        "as one custom op); not with --zero 3 or --sequence-parallel")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--sequence-parallel", type=int, default=1, metavar="N",
                   help="split every packed row over N ranks (Ulysses all-to-all over attention "
                        "heads); the world size must be a multiple of N (default 1: off)")
    g.add_argument("--loss-chunk", type=int, default=1024,
                   help="label tokens per chunk of the chunked cross-entropy")
    g.add_argument("--deepspeed", metavar="CONFIG.json",
                   help="DeepSpeed config merged over the generated one")
    g.add_argument("--dist-timeout", type=float, default=1800, metavar="SECONDS",
                   help="a collective that waits this long for its peers (a rank died or hangs) "
                        "fails and the rank exits with code 1, even without a launcher")
    add_objective_args(ap)
    g = ap.add_argument_group("checkpoints and logging")
    g.add_argument("--save-every", type=int, default=0,
                   help="checkpoint every N optimizer steps (always at the end)")
    g.add_argument("--resume", metavar="auto|PATH",
                   help="auto: continue from OUTPUT/checkpoints/latest if it exists; PATH: a "
                        "checkpoint step directory or run directory")
    g.add_argument("--allow-dataset-change", action="store_true",
                   help="--resume a checkpoint trained on another dataset (same tokenizer): "
                        "weights and optimizer continue, the data stream starts at its beginning")
    g.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                   help="write a Hugging Face model to OUTPUT/export at the end")
    g.add_argument("--log-every", type=int, default=1,
                   help="progress-bar/console update interval in steps (metrics.jsonl gets "
                        "every step)")
    from train.eval_args import add_eval_args

    add_eval_args(ap)
    add_tracking_args(ap)
    add_config_arg(ap)
    return ap


# (flag, lowest, highest, whether the lowest is allowed): every number train-run takes. NaN and
# infinities fail every range; a bad value would otherwise train into non-finite weights or fail
# deep inside DeepSpeed or peft with a traceback.
INT_LIMIT = 2 ** 63 - 1
NUMBERS = (
    ("epochs", 1, INT_LIMIT, True), ("micro_batch", 1, INT_LIMIT, True),
    ("grad_accum", 1, INT_LIMIT, True), ("nproc", 1, 4096, True),
    ("log_every", 1, INT_LIMIT, True), ("loss_chunk", 1, INT_LIMIT, True),
    ("save_every", 0, INT_LIMIT, True), ("warmup_steps", 0, INT_LIMIT, True),
    ("max_steps", 0, INT_LIMIT, True), ("seed", 0, 2 ** 32 - 1, True),
    ("skip_nonfinite", 0, INT_LIMIT, True),
    ("lr", 0.0, 1e3, True), ("min_lr", 0.0, 1e3, True), ("weight_decay", 0.0, 1e3, True),
    ("grad_clip", 0.0, 1e9, True), ("dist_timeout", 0.0, 1e7, False),
    ("lora_r", 1, 1 << 16, True), ("lora_alpha", 0.0, 1e9, False),
    ("lora_dropout", 0.0, 1.0, True), ("eval_every", 0, INT_LIMIT, True),
    ("eval_max_packs", 1, INT_LIMIT, True), ("sequence_parallel", 1, 4096, True),
    ("beta", 0.0, 1e6, False), ("simpo_gamma", 0.0, 1e6, True),
)


def check_numbers(args: argparse.Namespace) -> None:
    """Every numeric flag in its range, in one line naming it."""
    for name, lo, hi, lo_ok in NUMBERS:
        v = getattr(args, name)
        if v is None:
            continue
        ok = (lo <= v if lo_ok else lo < v) and v <= hi and math.isfinite(v)
        if not ok:
            low = f">= {lo}" if lo_ok else f"> {lo}"
            raise PacktrainError(f"--{name.replace('_', '-')} {v}: must be a finite number {low} "
                                 f"and <= {hi:g}")
    if args.lora_dropout >= 1:
        raise PacktrainError(f"--lora-dropout {args.lora_dropout}: must be below 1")
    if args.min_lr > args.lr:
        raise PacktrainError(f"--min-lr {args.min_lr}: must not exceed --lr {args.lr}")


def parse_run_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    parser = run_parser()
    args = parser.parse_args(expand_config(run_parser, argv))
    from pack.remote import dataset_name, is_url, redact, resolve
    from train.mixture import parse_shards

    parse_shards(args)  # several --shards: resolved here; args.shards is the first one

    url = args.shards if is_url(args.shards) else None
    if url and args.output is None:
        args.output = str(Path("runs") / dataset_name(url))
    if args.output is None:
        args.output = str(Path("runs") / Path(os.path.abspath(args.shards)).name)
    check_numbers(args)
    from train.preference_setup import check_preference_args

    check_preference_args(args)
    check_installed(args)
    from train.qlora import check_args as check_qlora

    check_qlora(args)
    for flag in ("shards", "model", "output", "resume", "deepspeed", "cache_dir", "tracking_dir",
                 "ref_model"):
        if getattr(args, flag) is not None and not str(getattr(args, flag)).strip():
            # an empty --output would train into the current directory
            raise PacktrainError(f"--{flag.replace('_', '-')}: empty; give a path or leave the "
                                 f"option out")
    from train.eval_args import resolve_eval_args

    resolve_eval_args(args)
    if url:  # from here on a local cache view of the URL; shards arrive on first use
        args.shards_url, args.shards = redact(url), resolve(url, args.cache_dir)
    args.effective_config = run_config(parser, args)  # OUTPUT/config.yaml, the trackers
    return args


def user_error(e: Exception) -> int:
    """Print a user error as one line (naming the rank when not 0); the exit status, 2."""
    rank = int(os.environ.get("RANK", "0"))
    where = f" (rank {rank})" if rank else ""
    msg = " ".join(str(e).split()) or type(e).__name__
    print(f"error{where}: {msg}", file=sys.stderr, flush=True)
    return 2


_LOST_PEER = re.compile(r"gloo|Connection closed by peer|Connection reset|[Tt]imed out|NCCL|"
                        r"Socket Timeout|ProcessGroup")


def lost_peers(e: Exception) -> int:
    """Print one line for a rank that lost its peers (a collective failed); the exit status, 1."""
    rank = int(os.environ.get("RANK", "0"))
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    print(f"error (rank {rank}): lost contact with the other ranks ({first[:300]}); one of them "
          f"died or hangs (see its output); resume with --resume auto", file=sys.stderr, flush=True)
    return 1


def command_exit(body: Callable[[], int]) -> int:
    """Run a console command's body: a user error becomes one line and exit 2, Ctrl-C exit 130."""
    try:
        return body()
    except PacktrainError as e:
        return user_error(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def rank_exit(body: Callable[[], None]) -> int:
    """Run a rank's distributed work (train-run's, pack-ref's): 0 when done; a lost peer becomes
    one line and exit 1, a preemption (checkpoint written) exit 75; an attention backend's
    refusal is a user error."""
    import torch.distributed as tdist

    from train.attention import AttentionBackendError
    from train.dist import PREEMPTED_EXIT, Preempted, close_distributed_at_exit

    try:
        body()
        close_distributed_at_exit()
    except AttentionBackendError as e:
        raise PacktrainError(str(e)) from None
    except Preempted as e:
        # the checkpoint is complete; a launcher's SIGTERM while we exit must not turn
        # this clean stop into a kill
        with contextlib.suppress(ValueError):  # ValueError: not the main thread
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if int(os.environ.get("RANK", "0")) == 0:
            print(str(e), file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    except tdist.DistError as e:  # gloo/nccl: peer gone, collective timed out
        return lost_peers(e)
    except RuntimeError as e:  # gloo raises plain RuntimeError for a peer's closed socket
        if not _LOST_PEER.search(str(e)):
            raise
        return lost_peers(e)
    return 0


def run_main(argv: list[str] | None = None) -> int:
    """The train-run console script (exit codes: README)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return command_exit(lambda: _run(argv))


def _run(argv: list[str]) -> int:
    from train.launch import in_launched_rank, launch_local

    argv = expand_config(run_parser, argv)  # the ranks get the file's options as flags
    args = parse_run_args(argv)
    from train.mixture import read_manifests

    read_manifests(args)  # fail fast, in the parent, before any rank starts
    if args.nproc > 1 and not in_launched_rank():
        return launch_local(args.nproc, argv, args.output)
    from train.loop import train

    return rank_exit(lambda: train(args))


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
        return user_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(run_main())
