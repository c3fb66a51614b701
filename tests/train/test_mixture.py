"""train.mixture: weighted mixtures of packed datasets (train-run --shards a --shards b --mix ...).

Pure tests of the epoch's picks (proportions, determinism, coverage), the mixed stream (ranks,
resume), the command line (weights, mixture file, refusals), and short in-process train-runs on two
real-data datasets: per-dataset tokens in metrics.jsonl against the weights, exact resume in the
middle of a mixture, a single --shards unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pack.errors import PacktrainError
from pack.format import PackedDataset
from train.data import DataState
from train.mixture import (MixtureStream, dataset_picks, epoch_picks, epoch_targets,
                           parse_weights)

# ---------------------------------------------------------------- the picks (pure)


def _lengths(n: int, seed: int, lo: int = 300, hi: int = 512) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi + 1, size=n)


def _shares(lengths, targets, seed, epoch):
    picks = epoch_picks(lengths, targets, seed, epoch)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lengths])])
    all_lengths = np.concatenate(lengths)
    which = np.searchsorted(offsets, picks, side="right") - 1
    tokens = np.bincount(which, weights=all_lengths[picks], minlength=len(lengths))
    return tokens / tokens.sum(), picks


@pytest.mark.parametrize("weights", [(0.75, 0.25), (0.1, 0.9), (0.5, 0.3, 0.2),
                                     (0.02, 0.98), (0.9, 0.05, 0.05)])
def test_proportions_within_one_percent(weights):
    # 400, 30 and 120 packs: the small one is up-sampled up to ~8x, the big one down-sampled
    lengths = [_lengths(400, 1), _lengths(30, 2, 50, 512), _lengths(120, 3)][:len(weights)]
    targets = epoch_targets([int(x.sum()) for x in lengths], list(weights))
    for epoch in range(4):
        shares, _ = _shares(lengths, targets, seed=7, epoch=epoch)
        assert np.abs(shares - np.array(weights)).max() < 0.01, (weights, epoch, shares)


def test_default_weights_are_one_pass_over_each_dataset():
    lengths = [_lengths(50, 1), _lengths(20, 2)]
    totals = [int(x.sum()) for x in lengths]
    targets = epoch_targets(totals, [t / sum(totals) for t in totals])
    for epoch in range(3):
        picks = epoch_picks(lengths, targets, seed=0, epoch=epoch)
        assert sorted(picks.tolist()) == list(range(70))


def test_picks_deterministic_and_epochs_differ():
    lengths = [_lengths(60, 1), _lengths(25, 2)]
    targets = epoch_targets([int(x.sum()) for x in lengths], [0.3, 0.7])
    a = epoch_picks(lengths, targets, seed=3, epoch=1)
    assert np.array_equal(a, epoch_picks(lengths, targets, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_picks(lengths, targets, seed=3, epoch=2))
    assert not np.array_equal(a, epoch_picks(lengths, targets, seed=4, epoch=1))


def test_down_sampled_dataset_reaches_every_pack():
    lengths = _lengths(100, 5)
    target = int(lengths.sum()) // 7  # ~14 packs per epoch
    seen = []
    for epoch in range(7):
        seen.extend(dataset_picks(lengths, target, seed=0, dataset=0, epoch=epoch).tolist())
    # seven epochs of 1/7 of the dataset: exactly one pass, every pack once
    assert sorted(seen) == list(range(100))
    # up-sampling: 2.5 passes in one epoch, every pack at least twice, none more than 3 times
    counts = np.bincount(dataset_picks(lengths, int(lengths.sum() * 2.5), 0, 0, 0), minlength=100)
    assert counts.min() >= 2 and counts.max() <= 3


# ---------------------------------------------------------------- the stream (synthetic datasets)

@pytest.fixture(scope="module")
def two_synth(tmp_path_factory) -> list[PackedDataset]:
    from test_data import synthetic_dataset

    root = tmp_path_factory.mktemp("mix-synth")
    return [PackedDataset(synthetic_dataset(root / "a", 23, seed=1)),
            PackedDataset(synthetic_dataset(root / "b", 9, seed=2))]


def _drain(stream, steps):
    out = []
    for _ in range(steps):
        mbs, epoch = stream.next_step()
        out.append((epoch, [(mb.pack_ids, mb.token_groups.tolist()) for mb in mbs]))
    return out


def test_stream_ranks_groups_and_resume(two_synth):
    kw = dict(seed=5, world_size=2, micro_batch=2, grad_accum=2)
    streams = [MixtureStream(two_synth, [0.4, 0.6], rank=r, **kw) for r in range(2)]
    size = streams[0].epoch_size(0)
    steps = streams[0].steps_for_epochs(1)
    assert steps == -(-size // 8)
    seen = []
    for s in streams:
        for _, mbs in _drain(s, steps):
            for ids, groups in mbs:
                seen.extend(ids)
                # every token carries the dataset of its pack
                want = [d for i in ids for d in [int(i >= 23)] * len(two_synth[int(i >= 23)][
                    i - 23 * int(i >= 23)]["input_ids"])]
                assert groups == want
    assert sorted(set(seen)) == sorted(set(streams[0].order(0).tolist()))
    assert all(s.state == DataState(1, 0) for s in streams)
    # resume mid-epoch: a new stream at a saved state continues the identical sequence
    ref = MixtureStream(two_synth, [0.4, 0.6], rank=1, **kw)
    _drain(ref, 2)
    saved = ref.state
    later = _drain(ref, steps)
    resumed = MixtureStream(two_synth, [0.4, 0.6], rank=1, state=saved, **kw)
    assert _drain(resumed, steps) == later


# ---------------------------------------------------------------- the command line

def test_bad_mix_refused_in_one_line(tmp_path, capsys):
    from train.cli import run_main

    a, b = tmp_path / "a", tmp_path / "b"
    for mix, want in [("0.5", "1 weight(s) for 2"), ("a,b", "comma-separated"),
                      ("-1,2", "must be a finite number > 0"), ("0,1", "> 0"),
                      ("nan,1", "> 0"), ("inf,1", "> 0"), ("1,2,3", "3 weight(s)")]:
        rc = run_main(["--shards", str(a), "--shards", str(b), f"--mix={mix}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and want in err[0] and "--mix" in err[0], (mix, err)
    assert parse_weights("3,1", 2) == [0.75, 0.25]
    # no --shards at all
    assert run_main(["--model", str(a)]) == 2
    assert "--shards" in capsys.readouterr().err


def test_mix_file_equals_flags(tmp_path):
    from train.cli import parse_run_args

    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    f = tmp_path / "mix.json"
    f.write_text(json.dumps([{"path": "x", "weight": 3}, {"path": str(tmp_path / "y"),
                                                            "weight": 1}]))
    by_file = parse_run_args(["--mix", str(f)])
    by_flags = parse_run_args(["--shards", str(tmp_path / "x"), "--shards", str(tmp_path / "y"),
                               "--mix", "3,1"])
    for args in (by_file, by_flags):
        assert [Path(p) for p in args.shards_list] == [tmp_path / "x", tmp_path / "y"]
        assert args.mix_weights == [0.75, 0.25] and args.output == str(Path("runs") / "x+y")
    y = tmp_path / "mix.yaml"
    y.write_text("datasets:\n  - {path: x, weight: 1}\n  - {path: y}\n")
    assert parse_run_args(["--mix", str(y)]).mix_weights == [0.5, 0.5]
    with pytest.raises(PacktrainError, match="leave out --shards"):
        parse_run_args(["--shards", "x", "--mix", str(f)])
    y.write_text("- {weight: 1}\n")
    with pytest.raises(PacktrainError, match="entry 1 needs a 'path'"):
        parse_run_args(["--mix", str(y)])


def test_single_shards_parses_as_before(tmp_path):
    from train.cli import parse_run_args

    args = parse_run_args(["--shards", str(tmp_path)])
    assert args.shards == str(tmp_path) and not hasattr(args, "shards_list")
    assert args.output == str(Path("runs") / tmp_path.name)


# ---------------------------------------------------------------- train-run on two datasets

COMMON = ["--dtype", "fp32", "--lr", "3e-3", "--schedule", "constant", "--warmup-steps", "2",
          "--seed", "0", "--zero", "0", "--no-export", "--micro-batch", "12", "--log-every", "50"]
MICRO = 12


@pytest.fixture(scope="module")
def big(tokenizer_dir, work) -> Path:
    """A second dataset: ~130 packs of <= 128 tokens from 400 real records (dir name 'packed',
    like `dataset`'s: the names must be made unique)."""
    from helpers import make_packed_dataset

    return make_packed_dataset(tokenizer_dir, work / "big", max_length=128, records=400)


def _mix_args(dataset, big, model_dir, out, *extra):
    from train.cli import parse_run_args

    return parse_run_args(["--shards", str(dataset), "--shards", str(big), "--mix", "0.25,0.75",
                           "--model", str(model_dir), "--output", str(out), *COMMON, *extra])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mixed_run(inproc, dataset, big, model_dir, work) -> Path:
    from train.loop import train

    out = work / "mixed-full"
    train(_mix_args(dataset, big, model_dir, out, "--epochs", "1"))
    return out




def test_mixture_tokens_match_weights(mixed_run, dataset, big):
    rows = _metrics(mixed_run)
    run = json.loads((mixed_run / "run.json").read_text())
    names = [d["name"] for d in run["datasets"]]
    assert names == ["packed", "packed-2"]
    assert [d["weight"] for d in run["datasets"]] == [0.25, 0.75]
    assert [d["path"] for d in run["datasets"]] == [str(dataset.resolve()), str(big.resolve())]
    assert all(len(d["manifest_sha256"]) == 64 for d in run["datasets"])
    assert rows[-1]["epoch"] == 0 and len(rows) == run["total_steps"]
    tokens = np.array([sum(r[f"tokens/{n}"] for r in rows) for n in names], dtype=float)
    # the plan: the epoch's picks, then the last step's wrap-around repeats of its first packs
    plan = MixtureStream([PackedDataset(dataset), PackedDataset(big)], [0.25, 0.75],
                         micro_batch=MICRO)
    size, order = plan.epoch_size(0), plan.order(0)
    positions = np.arange(len(rows) * MICRO)
    lengths = np.concatenate(plan.lengths)
    which = (order[positions % size] >= len(plan.lengths[0])).astype(int)
    planned = np.bincount(which, weights=lengths[order[positions % size]], minlength=2)
    assert np.array_equal(tokens, planned)  # metrics.jsonl counted exactly the planned packs
    repeats = np.bincount(which[positions >= size],
                          weights=lengths[order[positions[positions >= size] % size]],
                          minlength=2)
    share = (tokens - repeats) / (tokens - repeats).sum()
    assert abs(share[0] - 0.25) < 0.01 and abs(share[1] - 0.75) < 0.01, share
    # the small dataset was up-sampled, the big one down-sampled
    small = run["datasets"][0]
    assert tokens[0] > small["tokens"] and tokens[1] < run["datasets"][1]["tokens"]
    for r in rows:  # per-dataset sums add up to the step's totals and its loss
        assert sum(r[f"tokens/{n}"] for n in names) == r["tokens"]
        assert sum(r[f"label_tokens/{n}"] for n in names) == r["label_tokens"]
        total = sum(r[f"loss/{n}"] * r[f"label_tokens/{n}"] for n in names
                    if r[f"label_tokens/{n}"])
        assert abs(total / r["label_tokens"] - r["loss"]) < 1e-5 * r["loss"]


def test_mixture_resume_mid_epoch_is_exact(mixed_run, dataset, big, model_dir, work):
    from train.cli import parse_run_args
    from train.loop import train

    part = work / "mixed-part"
    # the schedule is constant after warm-up: a run to 6 steps matches the first 6 of a whole
    # epoch's run
    train(_mix_args(dataset, big, model_dir, part, "--max-steps", "3"))
    state = json.loads((part / "checkpoints" / "step-00000003" / "packtrain_state.json")
                       .read_text())
    assert state["data"] == {"epoch": 0, "index": 3 * MICRO}
    train(_mix_args(dataset, big, model_dir, part, "--max-steps", "6", "--resume", "auto"))
    a, b = _metrics(mixed_run)[:6], _metrics(part)
    assert len(b) == 6
    for x, y in zip(a, b):
        for k in x:
            if k.startswith(("loss", "tokens/", "label_tokens")):
                assert (x[k] is None and y[k] is None) or abs(x[k] - y[k]) < 1e-6, (k, x, y)
    # another mixture (other weights) is another dataset for a resume
    with pytest.raises(PacktrainError, match="--allow-dataset-change"):
        train(parse_run_args(["--shards", str(dataset), "--shards", str(big), "--mix", "0.5,0.5",
                              "--model", str(model_dir), "--output", str(part), *COMMON,
                              "--max-steps", "20", "--resume", "auto"]))


def test_fingerprint_mismatch_refused(dataset, tmp_path, capsys):
    from train.cli import run_main

    other = tmp_path / "other"
    shutil.copytree(dataset, other)
    m = json.loads((other / "manifest.json").read_text())
    m["tokenizer"]["fingerprint"] = "sha256:" + "1" * 64
    (other / "manifest.json").write_text(json.dumps(m))
    rc = run_main(["--shards", str(dataset), "--shards", str(other), "--output",
                   str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "another tokenizer" in err[0] and str(other.resolve()) in err[0]
    assert not (tmp_path / "run").exists()


def test_single_shards_metrics_unchanged(inproc, dataset, model_dir, work):
    from train.loop import train
    from train.cli import parse_run_args

    out = work / "single"
    train(parse_run_args(["--shards", str(dataset), "--model", str(model_dir), "--output",
                          str(out), *COMMON, "--max-steps", "2"]))
    rows = _metrics(out)
    assert set(rows[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "label_tokens",
                            "tokens_per_s", "elapsed_s"}
    assert "datasets" not in json.loads((out / "run.json").read_text())


# ---------------------------------------------------------------- per-dataset loss sums

@pytest.mark.parametrize("plain", [True, False], ids=["linear-head", "wrapped-head"])
def test_group_sums_equal_per_token_cross_entropy(plain):
    import torch.nn.functional as F

    from train.loss import head_cross_entropy

    class Wrapped(torch.nn.Linear):  # not a plain nn.Linear: the checkpointed per-chunk path
        def forward(self, x):
            return super().forward(x)

    torch.manual_seed(0)
    head = (torch.nn.Linear if plain else Wrapped)(8, 50, bias=False)
    hidden = torch.randn(40, 8, requires_grad=True)
    labels = torch.randint(0, 50, (40,))
    labels[[0, 17, 30]] = -100  # pack / sample starts
    cu = torch.tensor([0, 17, 30, 40], dtype=torch.int32)
    token_groups = torch.tensor([0] * 17 + [1] * 13 + [0] * 10)
    sums = torch.zeros(2, dtype=torch.float64)
    loss, n = head_cross_entropy(head, hidden, labels, chunk_size=7, cu_seqlens=cu,
                                 groups=(token_groups, sums))
    ref_loss, ref_n = head_cross_entropy(head, hidden, labels, chunk_size=7, cu_seqlens=cu)
    assert n == ref_n and torch.allclose(loss, ref_loss, atol=1e-5)
    # the reference: per-token CE of the shifted targets, summed by the position's group
    targets = torch.full((40,), -100)
    targets[:-1] = labels[1:]
    targets[cu[1:] - 1] = -100
    ce = F.cross_entropy(head(hidden).detach(), targets, reduction="none", ignore_index=-100)
    want = torch.zeros(2, dtype=torch.float64).index_add_(0, token_groups, ce.double())
    assert torch.allclose(sums, want, atol=1e-4), (sums, want)
    assert abs(float(sums.sum()) - loss.item()) < 1e-4


# ---------------------------------------------------------------- a URL in a mixture

def test_url_dataset_mixes_like_local(dataset, big, tmp_path):
    """A dataset given as a URL (file://, through pack.remote like s3://) opens into the same
    mixture as its local copy: same plan, same packs, and run.json names the URL."""
    from types import SimpleNamespace

    from pack import remote
    from train.cli import parse_run_args
    from train.mixture import dataset_labels, open_stream

    url = (tmp_path / "published" / "big").as_uri()
    remote.upload_dataset(big, remote.check_target(url, overwrite=False), quiet=True)
    one = SimpleNamespace(rank=0, world_size=1)
    checked, opened = [], []
    for spec in (url, str(big)):
        args = parse_run_args(["--shards", str(dataset), "--shards", spec, "--mix", "1,3",
                               "--cache-dir", str(tmp_path / "cache"), "--micro-batch", "3"])
        opened.append(open_stream(args, json.loads((dataset / "manifest.json").read_text()), one,
                                  lambda path, m, full: checked.append((path, full))))
        assert opened[-1].datasets[1]["path"] == dataset_labels(args)[1]
    (by_url, by_path) = opened
    assert by_url.datasets[1]["path"] == url and by_url.datasets[0] == by_path.datasets[0]
    assert [c[1] for c in checked] == [False, True]  # a URL's shards are checked as they arrive
    assert by_url.manifest_sha256 == by_path.manifest_sha256
    for _ in range(3):
        a, _ = by_url.stream.next_step()
        b, _ = by_path.stream.next_step()
        assert a[0].pack_ids == b[0].pack_ids
        assert torch.equal(a[0].input_ids, b[0].input_ids)
        assert torch.equal(a[0].token_groups, b[0].token_groups)
