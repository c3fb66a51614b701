"""train-run --report-to (train.tracking) and OUTPUT/config.yaml (train.run_config).

One in-process run of 3 steps reports to TensorBoard, W&B (offline) and MLflow (a file store
inside OUTPUT) at once; each tracker's files are read back with its own reader and hold
metrics.jsonl's per-step loss. A second run from that run's OUTPUT/config.yaml gives the same
per-step losses. Nothing here touches the network.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from test_loop import losses, metrics

TRACKED = ["--zero", "0", "--dtype", "fp32", "--lr", "3e-3", "--max-steps", "3",
           "--no-export", "--log-every", "3"]


@pytest.fixture(scope="module")
def tracked_run(inproc, dataset, model_dir, work):  # noqa: F811
    from train.cli import parse_run_args
    from train.loop import train

    out = work / "tracked"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI",
                    "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(var, raising=False)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        train(parse_run_args(["--shards", str(dataset), "--model", str(model_dir), "--output",
                              str(out), *TRACKED, "--report-to", "tensorboard,wandb,mlflow"]))
    return out


def test_tensorboard_holds_the_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked_run / "tensorboard"))
    acc.Reload()
    lines = metrics(tracked_run)
    assert len(lines) == 3
    for field in ("loss", "lr", "grad_norm", "tokens_per_s"):
        got = [(e.step, e.value) for e in acc.Scalars(field)]
        assert [s for s, _ in got] == [1, 2, 3]
        assert [v for _, v in got] == pytest.approx([m[field] for m in lines], rel=1e-6)
    assert "step" not in acc.Tags()["scalars"]
    assert {"config/text_summary", "dataset/text_summary"} <= set(acc.Tags()["tensors"])


def wandb_records(run_file: Path) -> list:
    """The protobuf records of an offline W&B run file (LevelDB log format: 32 KiB blocks of
    chunks with a 7-byte header; after the file's own 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk, records = run_file.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            r = pb.Record()
            r.ParseFromString(chunk)
            records.append(r)
            chunk = b""
    return records


def test_wandb_offline_writes_its_run(tracked_run):
    runs = list((tracked_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    records = wandb_records(runs[0])
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in r.history.item} for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["loss"] for h in history] == pytest.approx(losses(tracked_run), rel=1e-9)
    assert [h["_step"] for h in history] == [1, 2, 3]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == tracked_run.name
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["max-steps"] == 3 and config["report-to"] == "tensorboard,wandb,mlflow"
    assert config["dataset"]["packs"] == 29
    assert config["dataset"]["tokenizer_fingerprint"].startswith("sha256:")


def test_mlflow_file_store_holds_the_metrics(tracked_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tracked_run / "mlruns").as_uri())
    exp = client.get_experiment_by_name("packtrain")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == tracked_run.name and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx(losses(tracked_run), rel=1e-9)
    assert run.data.params["lr"] == "0.003" and run.data.params["dataset.packs"] == "29"


def test_config_file_repeats_the_run(tracked_run, work):
    from train.cli import parse_run_args
    from train.loop import train

    import yaml

    config = tracked_run / "config.yaml"
    recorded = yaml.safe_load(config.read_text())
    assert "resume" not in recorded and recorded["output"] == str(tracked_run)
    again = work / "again"
    # the tracking options come from the file too; the command line overrides them
    train(parse_run_args(["--config", str(config), "--output", str(again), "--report-to",
                          "none"]))
    assert losses(again) == losses(tracked_run)
    assert not (again / "tensorboard").exists() and (again / "config.yaml").is_file()


def test_unknown_config_key_is_one_line(tmp_path, capsys):
    from train.cli import run_main

    cfg = tmp_path / "run.yaml"
    cfg.write_text("shards: /nowhere\nlearning-rate: 0.1\n")
    assert run_main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {cfg}: unknown key 'learning-rate' (not a train-run option; see "
                   f"train-run --help)"]


@pytest.mark.parametrize("backend", ["tensorboard", "wandb", "mlflow"])
def test_missing_tracker_package_names_the_extra(backend, dataset, tmp_path, monkeypatch, capsys):
    from pack.errors import PacktrainError
    from train.cli import run_main
    from train.tracking import MODULES, import_backend

    monkeypatch.setitem(sys.modules, MODULES[backend], None)  # `import` now fails
    rc = run_main(["--shards", str(dataset), "--output", str(tmp_path / "o"),
                   "--report-to", backend])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --report-to {backend}: the {backend} package is not installed; "
        f"pip install 'packtrain[{backend}]'"]
    with pytest.raises(PacktrainError, match=rf"packtrain\[{backend}\]"):
        import_backend(backend)


def test_report_to_values():
    from train.cli import parse_run_args

    with pytest.raises(SystemExit):
        parse_run_args(["--shards", "x", "--report-to", "tensorboard,comet"])
    with pytest.raises(SystemExit):
        parse_run_args(["--shards", "x", "--report-to", "none,wandb"])


def test_tracking_dir_that_is_a_file(tmp_path):
    from argparse import Namespace
    from types import SimpleNamespace

    from pack.errors import PacktrainError
    from train.tracking import Trackers

    a_file = tmp_path / "f"
    a_file.write_text("x")
    run = SimpleNamespace(args=Namespace(report_to="tensorboard", tracking_dir=str(a_file / "x"),
                                         shards=str(tmp_path), effective_config={}),
                          out=tmp_path, manifest={}, manifest_sha256="")
    with pytest.raises(PacktrainError, match=r"^--tracking-dir .*: cannot create it"):
        Trackers(run)


def test_trackers_log_numbers_and_mark_a_failed_run():
    from argparse import Namespace
    from types import SimpleNamespace

    from train.tracking import Trackers

    trackers = Trackers(SimpleNamespace(args=Namespace(report_to="none")))
    seen, closed = [], []
    trackers.backends = [(lambda step, values: seen.append((step, values)), closed.append)]
    trackers.log({"step": 4, "loss": 1.5, "eval_loss": 2, "grad_norm": None, "note": "x",
                  "flag": True})
    assert seen == [(4, {"loss": 1.5, "eval_loss": 2.0})]
    with pytest.raises(RuntimeError):
        try:
            raise RuntimeError("stopped")
        finally:
            trackers.close()
    trackers.backends = [(None, closed.append)]
    trackers.close()
    assert closed == [True, False]
