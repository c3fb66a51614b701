"""train-run's evaluation flags (--eval-shards, --eval-every, --eval-max-packs, --no-eval,
--save-best) and where the eval set comes from; kept free of torch so that parsing stays light.
What evaluation does: train.evaluate.
"""

from __future__ import annotations

import argparse
from argparse import Namespace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pack.errors import PacktrainError
from pack.format import MANIFEST, read_manifest


def add_eval_args(ap: argparse.ArgumentParser) -> None:
    """train-run's evaluation options."""
    g = ap.add_argument_group("evaluation")
    g.add_argument("--eval-shards", metavar="DIR|URL",
                   help="packed dataset to compute a validation loss on (same tokenizer as "
                        "--shards; default: SHARDS/eval when it holds a manifest.json)")
    g.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="evaluate every N optimizer steps (always at step 0 and at the end when "
                        "there is an eval set; 0: only then)")
    g.add_argument("--eval-max-packs", type=int, default=None, metavar="N",
                   help="evaluate on the first N packs of the eval set only (default: all)")
    g.add_argument("--no-eval", action="store_true",
                   help="no evaluation, even when SHARDS/eval exists")
    g.add_argument("--save-best", action="store_true",
                   help="checkpoint each new lowest eval loss and name it in "
                        "OUTPUT/checkpoints/best (needs an eval set and --eval-every)")


def default_eval_shards(shards: str) -> str | None:
    """SHARDS/eval (directory or URL) when it holds a manifest, else None."""
    from pack.remote import is_url, open_store

    if not is_url(shards):
        child = Path(shards) / "eval"
        return str(child) if (child / MANIFEST).is_file() else None
    parts = urlsplit(shards)
    child = urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/eval"))
    return child if open_store(child).exists(MANIFEST) else None


def resolve_eval_args(args: Namespace) -> None:
    """Settle the eval set from the flags (while args.shards is still as given): args.eval_shards
    becomes a local directory or cache view (None: no evaluation), args.eval_shards_url the
    redacted URL. Flags that need an eval set are refused without one."""
    from pack.remote import is_url, redact, resolve

    args.eval_shards_url = None
    if args.eval_shards is not None and not str(args.eval_shards).strip():
        raise PacktrainError("--eval-shards: empty; give a path or URL or leave the option out")
    if args.no_eval:
        if args.eval_shards or args.save_best:
            raise PacktrainError("--no-eval: cannot be combined with --eval-shards or --save-best")
        args.eval_shards = None
        return
    # a mixture has no single parent split to default to: its eval set is named explicitly
    mixture = len(getattr(args, "shards_list", None) or []) > 1
    src = args.eval_shards or (None if mixture else default_eval_shards(args.shards))
    if src is None:
        for flag, given in (("--eval-every", args.eval_every), ("--eval-max-packs",
                                                                args.eval_max_packs),
                            ("--save-best", args.save_best)):
            if given:
                raise PacktrainError(f"{flag}: no eval set; pass --eval-shards DIR|URL (or pack "
                                     f"a held-out split into {args.shards}/eval)")
        args.eval_shards = None
        return
    if args.save_best and not args.eval_every:
        raise PacktrainError("--save-best needs --eval-every N: the best checkpoint is chosen "
                             "among the evaluated steps")
    if is_url(src):
        args.eval_shards_url, args.eval_shards = redact(src), resolve(src, args.cache_dir)
    else:
        args.eval_shards = src
        try:  # fail fast, in one line, before any rank starts
            read_manifest(src)
        except PacktrainError as e:
            raise PacktrainError(f"--eval-shards {e}") from None
