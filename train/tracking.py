"""Experiment tracking (``train-run --report-to tensorboard,wandb,mlflow``), on rank 0 only.

Each backend gets, at its start, the run's effective config (what ``OUTPUT/config.yaml`` holds)
and the dataset's summary; then every numeric field of every ``metrics.jsonl`` line at that
line's step (the fields are not listed here: whatever the loop records is tracked). Where they
write:

* tensorboard: ``TRACKING_DIR/tensorboard`` (event files; ``tensorboard --logdir``);
* wandb: ``$WANDB_DIR``, else ``TRACKING_DIR``; project ``$WANDB_PROJECT`` or ``packtrain``;
  ``WANDB_MODE=offline`` keeps it off the network;
* mlflow: ``$MLFLOW_TRACKING_URI``, else a file store in ``TRACKING_DIR/mlruns``; experiment
  ``$MLFLOW_EXPERIMENT_NAME`` or ``packtrain``.

``TRACKING_DIR`` is ``--tracking-dir``, else the run's OUTPUT; the run's name is OUTPUT's name.
Each backend's package is imported only when chosen; a missing one is a one-line error naming
the extra to install (checked before any rank starts).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from pack.errors import PacktrainError

BACKENDS = ("tensorboard", "wandb", "mlflow")
# the module each backend needs, and the extra that installs it
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def report_to(text: str) -> str:
    """argparse type of --report-to: ``none`` or a comma-separated list of BACKENDS."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    bad = [n for n in names if n not in BACKENDS + ("none",)]
    if not names or bad or ("none" in names and len(names) > 1):
        raise argparse.ArgumentTypeError(f"{text!r}: give none, or one or more of "
                                         f"{', '.join(BACKENDS)} separated by commas")
    return ",".join(dict.fromkeys(names))


def add_tracking_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("experiment tracking")
    g.add_argument("--report-to", type=report_to, default="none", metavar="none|" +
                   "|".join(BACKENDS),
                   help="send every metrics.jsonl field, the effective config and the dataset's "
                        "summary to these trackers (comma-separated; rank 0 only)")
    g.add_argument("--tracking-dir", metavar="DIR",
                   help="where local tracker files go (default: OUTPUT): tensorboard/, "
                        "wandb/ (unless $WANDB_DIR), mlruns/ (unless $MLFLOW_TRACKING_URI)")


def chosen(args: Any) -> list[str]:
    text = getattr(args, "report_to", None) or "none"
    return [n for n in text.split(",") if n != "none"]


def _missing(backend: str) -> PacktrainError:
    return PacktrainError(f"--report-to {backend}: the {backend} package is not installed; "
                          f"pip install 'packtrain[{backend}]'")


def check_installed(args: Any) -> None:
    """A one-line error for the first chosen backend whose package is missing."""
    for name in chosen(args):
        try:
            found = importlib.util.find_spec(MODULES[name]) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise _missing(name)


def import_backend(backend: str) -> Any:
    """The backend's package, or a one-line error naming the extra that installs it."""
    try:
        return importlib.import_module(MODULES[backend])
    except ImportError:
        raise _missing(backend) from None


def numeric(metrics: dict) -> dict[str, float]:
    """The numeric fields of a metrics line, except the step itself."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def dataset_summary(run: Any) -> dict:
    m, s = run.manifest, run.manifest.get("stats", {})
    return {"path": getattr(run.args, "shards_url", None) or str(run.args.shards),
            "manifest_sha256": run.manifest_sha256,
            "tokenizer_fingerprint": m.get("tokenizer", {}).get("fingerprint"),
            "max_length": m.get("max_length"), "samples": s.get("samples_packed"),
            "tokens": s.get("tokens"), "label_tokens": s.get("label_tokens"),
            "packs": s.get("packs"), "fill": s.get("fill")}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------- backends
# Each: (run, config, summary, where) -> (log(step, values), close(failed)).

Backend = tuple[Callable[[int, dict], None], Callable[[bool], None]]


def tensorboard(run: Any, config: dict, summary: dict, where: Path) -> Backend:
    import yaml

    import_backend("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(where / "tensorboard"))
    # TensorBoard renders text as Markdown: an indented code block keeps the YAML as it is
    writer.add_text("config", _code(yaml.safe_dump(config, sort_keys=False)), 0)
    writer.add_text("dataset", _code(yaml.safe_dump(summary, sort_keys=False)), 0)

    def log(step: int, values: dict) -> None:
        for k, v in values.items():
            writer.add_scalar(k, v, step)
        writer.flush()

    return log, lambda failed: writer.close()


def _code(text: str) -> str:
    return "".join(f"    {line}\n" for line in text.splitlines())


def wandb(run: Any, config: dict, summary: dict, where: Path) -> Backend:
    wb = import_backend("wandb")
    directory = os.environ.get("WANDB_DIR") or str(where)
    Path(directory).mkdir(parents=True, exist_ok=True)
    r = wb.init(project=os.environ.get("WANDB_PROJECT") or "packtrain", name=run.out.name,
                dir=directory, config={**config, "dataset": summary})
    for k, v in summary.items():
        r.summary[f"dataset/{k}"] = v

    def log(step: int, values: dict) -> None:
        r.log(values, step=step)

    return log, lambda failed: r.finish(exit_code=1 if failed else 0)


def mlflow(run: Any, config: dict, summary: dict, where: Path) -> Backend:
    import_backend("mlflow")
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = (where / "mlruns").resolve().as_uri()
        # MLflow 3 refuses file stores unless asked; packtrain[mlflow] (mlflow-skinny) has no
        # database store, and a local file store is what this default means
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "packtrain"
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
    run_id = client.create_run(exp_id, run_name=run.out.name).info.run_id
    params = flatten({**config, "dataset": summary})
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log(step: int, values: dict) -> None:
        ms = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, ms, step) for k, v in values.items()])

    return log, lambda failed: client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


OPENERS = {"tensorboard": tensorboard, "wandb": wandb, "mlflow": mlflow}


class Trackers:
    """The chosen backends of one run (rank 0): ``log`` a metrics line, ``close`` at the end."""

    def __init__(self, run: Any) -> None:
        self.backends: list[Backend] = []
        names = chosen(run.args)
        if not names:
            return
        config = run.args.effective_config
        where = Path(getattr(run.args, "tracking_dir", None) or run.out)
        try:
            where.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PacktrainError(f"--tracking-dir {where}: cannot create it "
                                 f"({e.strerror or e}); give a writable directory") from None
        summary = dataset_summary(run)
        try:
            for name in names:
                self.backends.append(OPENERS[name](run, config, summary, where))
        except PacktrainError:
            self.close()
            raise
        except Exception as e:  # a tracker's own failure (bad URI, server): one line, by name
            self.close()
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise PacktrainError(f"--report-to {name}: could not start ({first[:300]})") from None

    def log(self, metrics: dict) -> None:
        values = numeric(metrics)
        for log, _ in self.backends:
            log(int(metrics["step"]), values)

    def close(self) -> None:
        """Finish every tracker; a run stopped by an exception (called from a ``finally``
        while it propagates) is marked failed where the tracker has such a state."""
        failed = sys.exc_info()[1] is not None
        backends, self.backends = self.backends, []
        for _, close in backends:
            close(failed)
