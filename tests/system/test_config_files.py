"""Config files: `pack-build --config`, `pack-info --config` (the manifest's arguments as a config
that rebuilds the same bytes), and pack.cli_config's mapping of YAML keys onto flags.
(train-run --config and OUTPUT/config.yaml: tests/train/test_tracking.py.)"""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from helpers import exchanges_jsonl
from pack.cli import build_main, info_main
from pack.cli_config import effective_config, expand_config
from pack.errors import PacktrainError


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer_dir):
    """A tiny corpus packed by `pack-build --config FILE` (inputs and OUT from the file too)."""
    work = tmp_path_factory.mktemp("config-build")
    corpus = exchanges_jsonl(work / "ex.jsonl", 40)
    cfg = work / "build.yaml"
    cfg.write_text(yaml.safe_dump({"inputs": [str(corpus)], "out": str(work / "first"),
                                   "tokenizer": str(tokenizer_dir), "max_length": 96,
                                   "shard-size": 5, "quiet": True, "workers": 1}))
    assert build_main(["--config", str(cfg)]) == 0
    return work


def test_build_from_config_file(built):
    m = json.loads((built / "first" / "manifest.json").read_text())
    assert m["max_length"] == 96 and len(m["shards"]) > 1  # shard-size 5 packs
    assert m["arguments"]["inputs"] == [str(built / "ex.jsonl")] and m["arguments"]["quiet"]


def test_info_config_rebuilds_the_same_bytes(built, capsys):
    assert info_main([str(built / "first"), "--config"]) == 0
    text = capsys.readouterr().out
    cfg = yaml.safe_load(text)
    assert cfg["max-length"] == 96 and "workers" in cfg and "partition" not in cfg  # null: out
    (built / "again.yaml").write_text(text)
    # the command line's OUT replaces the file's positionals; its flags win over the file's
    assert build_main(["--config", str(built / "again.yaml"), str(built / "ex.jsonl"),
                       str(built / "second"), "--workers", "2"]) == 0
    first = json.loads((built / "first" / "manifest.json").read_text())
    second = json.loads((built / "second" / "manifest.json").read_text())
    assert second["arguments"]["workers"] == 2
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in second["shards"]]
    for s in first["shards"]:
        assert (built / "first" / s["path"]).read_bytes() == \
            (built / "second" / s["path"]).read_bytes()


def test_unknown_key_is_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "b.yaml"
    cfg.write_text("max-length: 64\nmax-lenght: 128\n")
    assert build_main(["--config", str(cfg), "in.jsonl", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {cfg}: unknown key 'max-lenght' (not a pack-build option; see "
                   f"pack-build --help)"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo")
    p.add_argument("inputs", nargs="+")
    p.add_argument("out")
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--export", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--tag", action="append")
    p.add_argument("--pair", nargs=2)
    p.add_argument("--config")
    return p


def expand(tmp_path, text: str, *argv: str) -> argparse.Namespace:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    return parser().parse_args(expand_config(parser, ["--config", str(f), *argv]))


def test_values_map_onto_flags(tmp_path):
    ns = expand(tmp_path, "inputs: [a, b]\nout: o\nmax_length: 64\nlr: -1.5e-3\nquiet: true\n"
                          "export: false\ntag: [x, y]\npair: [1, 2]\n")
    assert (ns.inputs, ns.out, ns.max_length, ns.lr, ns.quiet, ns.export, ns.tag, ns.pair) == \
        (["a", "b"], "o", 64, -1.5e-3, True, False, ["x", "y"], ["1", "2"])
    ns = expand(tmp_path, "inputs: a\nout: o\nquiet: false\nexport: null\nlr: null\n")
    assert (ns.inputs, ns.quiet, ns.export, ns.lr) == (["a"], False, True, 0.1)
    # the command line wins: its flags come after the file's; its positionals replace the file's
    ns = expand(tmp_path, "inputs: [a]\nout: o\nmax-length: 64\n", "--max-length", "32", "c", "p")
    assert (ns.inputs, ns.out, ns.max_length) == (["c"], "p", 32)


def test_effective_config_reads_back(tmp_path):
    ns = parser().parse_args(["a", "o", "--lr", "0.5", "--no-export", "--tag", "t"])
    cfg = effective_config(parser(), ns)
    assert "config" not in cfg and cfg["max-length"] == 4096
    back = expand(tmp_path, yaml.safe_dump(cfg))
    assert vars(back) == {**vars(ns), "config": None}


@pytest.mark.parametrize("text, message", [
    ("max-length: [1, 2]\n", "max-length: expected a single value, not list"),
    ("max-length: true\n", "max-length: expected a single value, not true/false"),
    ("quiet: 1\n", "quiet: expected true or false"),
    ("export: yes please\n", "export: expected true or false"),
    ("- a\n- b\n", "must be a mapping of option names to values, not a list"),
    ("lr: [\n", ":2: not valid YAML"),
])
def test_bad_values_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(PacktrainError, match=message.replace("[", r"\[")):
        expand(tmp_path, text, "a", "o")


def test_config_flag_errors(tmp_path):
    with pytest.raises(PacktrainError, match="cannot read it"):
        expand_config(parser, ["--config", str(tmp_path / "none.yaml")])
    with pytest.raises(PacktrainError, match="given twice"):
        expand_config(parser, ["--config=a.yaml", "--config", "b.yaml"])
    with pytest.raises(PacktrainError, match="expected a file name"):
        expand_config(parser, ["--config"])


def test_train_config_repeats_a_mixture_and_the_command_line_replaces_its_datasets(built,
                                                                                    tmp_path):
    """OUTPUT/config.yaml of a mixture names every dataset, the weights and the eval set, and
    reads back into the same datasets; a --shards given on the command line replaces the file's
    (appended, it would have trained on a mixture of all of them)."""
    from pack.cli_config import write_config
    from train.cli import parse_run_args

    a, b, ev = tmp_path / "a", tmp_path / "b", built / "first"
    args = parse_run_args(["--shards", str(a), "--shards", str(b), "--mix", "0.75,0.25",
                           "--eval-shards", str(ev), "--output", str(tmp_path / "run")])
    cfg = args.effective_config
    assert cfg["shards"] == [str(a), str(b)] and cfg["mix"] == "0.75,0.25"
    assert cfg["eval-shards"] == str(ev)
    path = tmp_path / "config.yaml"
    write_config(path, cfg)
    again = parse_run_args(["--config", str(path)])
    assert again.shards_list == [str(a), str(b)] and again.mix_weights == args.mix_weights
    assert again.eval_shards == str(ev)
    other = tmp_path / "other"
    single = parse_run_args(["--config", str(path), "--shards", str(other), "--mix", "1"])
    assert single.shards == str(other) and not getattr(single, "shards_list", None)
