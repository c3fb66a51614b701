"""The run's effective config: every train-run option with the value it took (defaults
included), written by rank 0 at start to ``OUTPUT/config.yaml``; ``train-run --config
OUTPUT/config.yaml --output NEW`` repeats the run.

Left out: ``--resume`` (a repeat starts afresh; add ``--resume`` yourself to continue) and
``--config`` itself. Paths are made absolute. A ``--shards`` URL is recorded without its secrets (user:password, secret
query values): the repeat takes credentials from the environment.
"""

from __future__ import annotations

import json
from argparse import ArgumentParser, Namespace
from pathlib import Path

from pack.cli_config import effective_config, write_config
from pack.remote import REMOTE_INFO, is_remote

CONFIG_FILE = "config.yaml"
NOT_REPEATED = ("resume",)
# recorded absolute, so that the file repeats the run from any directory
PATHS = ("model", "output", "cache_dir", "deepspeed", "tracking_dir", "ref_model")


def run_config(parser: ArgumentParser, args: Namespace) -> dict:
    """The effective config of ``args`` parsed by train-run's ``parser`` (parse_run_args keeps
    it as ``args.effective_config``)."""
    absolute = {k: str(Path(v).absolute()) for k in PATHS if (v := getattr(args, k, None))}
    config = effective_config(parser, Namespace(**{**vars(args), **absolute}),
                              exclude=NOT_REPEATED)
    config["shards"] = _datasets(args)
    if args.mix is not None and Path(args.mix).suffix.lower() in (".json", ".yaml", ".yml"):
        config["mix"], config["shards"] = str(Path(args.mix).absolute()), None
    if getattr(args, "eval_shards", None):
        config["eval-shards"] = getattr(args, "eval_shards_url", None) or \
            str(Path(args.eval_shards).absolute())
    return config


def _datasets(args: Namespace) -> list[str]:
    """Every --shards as the user can give it again: a URL (redacted) for a cache view, else an
    absolute path; all of a mixture's, in order."""
    views = getattr(args, "shards_list", None) or [args.shards]
    urls = getattr(args, "shards_urls", None) or [getattr(args, "shards_url", None)]
    out = []
    for view, url in zip(views, urls):
        if url is None and is_remote(view):
            url = json.loads((Path(view) / REMOTE_INFO).read_text())["url"]
        out.append(url or str(Path(view).absolute()))
    return out


def write_run_config(out: Path, args: Namespace) -> None:
    """Write ``args.effective_config`` to OUTPUT/config.yaml (atomically)."""
    write_config(Path(out) / CONFIG_FILE, args.effective_config,
                 header="train-run's effective config for this run (every option, defaults "
                        "included).\nRepeat the run: train-run --config THIS_FILE --output "
                        "NEW_DIR (--resume is not recorded)")
