"""pack-build's sanity checks (pack/sanity.py): each check fires with the right count and first
record numbers and is clean on clean data; the refusals and their flags; the same report with
one or two workers and across partitions joined by pack-merge; the manifest, pack-info and card.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from pack import format as F
from pack import sanity
from pack.build import build
from pack.cli import build_main, info_main, merge_main
from pack.errors import PacktrainError

BOS = "<|begin_of_text|>"
MAXLEN = 32
# the corpus: 300 JSON Lines text records then 200 in a JSON array (record numbers 300-499)
DOUBLE_BOS = [10, 11, 12, 13, 150, 290, 305]
EMPTY = [20, 200, 440]
LONG = [30, 260, 499]


def _text(k: int) -> dict:
    if k in EMPTY:
        return {"text": ""}
    if k in LONG:
        return {"text": "many words here " * 40}
    return {"text": (BOS if k in DOUBLE_BOS else "") + f"record {k} says hello"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("sanity-corpus")
    a, b = d / "a.jsonl", d / "b.json"
    a.write_text("".join(json.dumps(_text(k)) + "\n" for k in range(300)))
    b.write_text(json.dumps([_text(k) for k in range(300, 500)]))
    return [a, b]


def _build(inputs, out, tok, **kw) -> dict:
    args = dict(inputs=[str(p) for p in inputs], out=str(out), tokenizer=str(tok),
                max_length=MAXLEN, workers=1, quiet=True)
    return build({**args, **kw})


@pytest.fixture(scope="module")
def whole(corpus, tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sanity") / "whole"
    _build(corpus, out, tokenizer_dir)
    return out


def test_each_check_counts_and_names_the_first_records(whole):
    m = F.read_manifest(whole)  # validated against the schema on reading
    c = m["checks"]
    assert c["double_bos"]["count"] == len(DOUBLE_BOS)
    assert c["double_bos"]["first_records"] == DOUBLE_BOS[:sanity.FIRST]
    assert c["no_labels"]["count"] == len(EMPTY) == m["stats"]["dropped"]["empty-text"]
    assert c["no_labels"]["first_records"] == EMPTY
    assert c["no_labels"]["share"] == round(3 / 500, 6)
    assert c["no_labels"]["max_share"] == sanity.MAX_NO_LABEL_SHARE
    t = c["truncated"]
    assert t["count"] == len(LONG) == m["stats"]["truncated"] and t["first_records"] == LONG
    assert t["tokens_lost"] == m["stats"]["truncated_tokens"] > 0
    assert t["token_share"] == round(t["tokens_lost"]
                                     / (t["tokens_lost"] + m["stats"]["tokens"]), 6)
    assert "turns" not in c  # no chat template
    # the record numbers are sample_index: the doubled ones really start with two BOS
    bos = m["tokenizer"]["bos_token_id"]
    starts = {}
    for row in F.PackedDataset(whole):
        for i, s in zip(row["sample_index"], row["cu_seqlens"][:-1]):
            starts[int(i)] = row["input_ids"][s:s + 2].tolist()
    assert sorted(i for i, ids in starts.items() if ids == [bos, bos]) == DOUBLE_BOS


def test_two_workers_report_the_same(whole, corpus, tokenizer_dir, tmp_path):
    m2 = _build(corpus, tmp_path / "w2", tokenizer_dir, workers=2)
    assert m2["checks"] == F.read_manifest(whole)["checks"]


def test_partitions_merged_report_the_same(whole, corpus, tokenizer_dir, tmp_path, capsys):
    parts = []
    for i in range(2):
        parts.append(tmp_path / f"part-{i}")
        mp = _build(corpus, parts[-1], tokenizer_dir, num_partitions=2, partition=i)
        assert 0 < mp["checks"]["double_bos"]["count"] < len(DOUBLE_BOS)
    assert merge_main([*map(str, parts), str(tmp_path / "merged"), "--quiet"]) == 0
    merged = F.read_manifest(tmp_path / "merged")
    assert merged["checks"] == F.read_manifest(whole)["checks"]


def test_merge_checks_sums_and_keeps_the_first_in_order():
    stats = {"records": 10, "tokens": 90, "truncated_tokens": 10}
    a = {"no_labels": {"count": 2, "first_records": [1, 8], "max_share": 0.5},
         "truncated": {"count": 1, "first_records": [3]}, "turns": {"distinct": True}}
    b = {"no_labels": {"count": 6, "first_records": [0, 2, 4, 5, 6]},
         "truncated": {"count": 0, "first_records": []}}
    c = sanity.merge_checks([a, b], stats)
    assert c["no_labels"] == {"count": 8, "first_records": [0, 1, 2, 4, 5], "max_share": 0.5,
                              "share": 0.8}
    assert c["truncated"] == {"count": 1, "first_records": [3], "share": 0.1,
                              "tokens_lost": 10, "token_share": 0.1}
    assert c["turns"] == {"distinct": True}
    assert sanity.merge_checks([a, None], stats) is None  # a part built before the checks


def test_summary_info_and_card_show_them(whole, capsys):
    assert info_main([str(whole)]) == 0
    out = capsys.readouterr().out
    assert "doubled BOS   WARNING 7 samples (1.40%): records 10, 11, 12, 13, 150, ..." in out
    assert "no labels     3 records (0.60%) dropped, limit 5%: records 20, 200, 440" in out
    assert "truncated     3 samples (0.60%)" in out and "records 30, 260, 499" in out
    card = (whole / "README.md").read_text()
    assert "## Checks" in card and "doubled BOS   WARNING 7 samples" in card


def test_build_summary_names_the_first_file_and_line(corpus, tokenizer_dir, tmp_path, capsys):
    assert build_main([*map(str, corpus), str(tmp_path / "o"), "--tokenizer",
                       str(tokenizer_dir), "--max-length", str(MAXLEN), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert f"records 10, 11, 12, 13, 150, ... (first {corpus[0]}:11)" in err
    assert f"records 20, 200, 440 (first {corpus[0]}:21)" in err
    # --quiet: no summary, but the warning still
    assert build_main([*map(str, corpus), str(tmp_path / "q"), "--tokenizer",
                       str(tokenizer_dir), "--max-length", str(MAXLEN), "--workers", "1",
                       "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {corpus[0]}:11: 7 sample(s) start "
                                               f"with two BOS tokens (records 10, 11, 12, 13, "
                                               f"150, ...)")


def test_no_labels_refused_above_the_share_and_the_override(tokenizer_dir, tmp_path, capsys):
    src = tmp_path / "few.jsonl"
    # line 1 is not JSON (skipped), so record 1 (empty) is on line 3
    src.write_text("{not json\n" + "".join(
        json.dumps({"text": "" if k in (1, 6) else f"record {k}"}) + "\n" for k in range(10)))
    args = [str(src), "--tokenizer", str(tokenizer_dir), "--workers", "1", "--quiet",
            "--skip-invalid"]
    assert build_main([*args, str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {src}:3: 2 of 10 records (20.0%) have no label token (records 1, "
                   f"6), more than --max-no-label-share 0.05; fix the data, template or "
                   f"--max-length, or pass --max-no-label-share 1 to drop them and pack the rest")
    assert not (tmp_path / "o1").exists()
    assert build_main([*args, str(tmp_path / "o2"), "--max-no-label-share", "0.2"]) == 0
    m = F.read_manifest(tmp_path / "o2")
    assert m["checks"]["no_labels"]["first_records"] == [1, 6]
    assert m["checks"]["no_labels"]["max_share"] == 0.2
    for bad in ("1.5", "-0.1", "nan", "x"):
        with pytest.raises(SystemExit):
            build_main([*args, str(tmp_path / "o3"), "--max-no-label-share", bad])
    with pytest.raises(PacktrainError, match="--max-no-label-share 2"):
        build(dict(inputs=[str(src)], out=str(tmp_path / "o4"), tokenizer=str(tokenizer_dir),
                   max_no_label_share=2))


ROLE_BLIND = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>speaker<|end_header_id|>"
              "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}")


def test_template_blind_to_roles_refused_unless_allowed(tokenizer_dir, chat_jsonl, tmp_path,
                                                        capsys):
    tpl = tmp_path / "blind.jinja"
    tpl.write_text(ROLE_BLIND)
    args = [str(chat_jsonl), "--tokenizer", str(tokenizer_dir), "--workers", "1", "--quiet",
            "--max-length", "512", "--chat-template", str(tpl)]
    assert build_main([*args, str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tpl}: the chat template renders user and assistant turns "
                          f"alike") and err.endswith("pass --allow-indistinct-turns")
    assert "\n" not in err and not (tmp_path / "o1").exists()
    assert build_main([*args, str(tmp_path / "o2"), "--allow-indistinct-turns"]) == 0
    assert "warning: the chat template renders user and assistant turns alike" in \
        capsys.readouterr().err
    m = F.read_manifest(tmp_path / "o2")
    assert m["checks"]["turns"] == {"distinct": False, "allowed": True}
    assert info_main([str(tmp_path / "o2")]) == 0
    assert "WARNING user and assistant rendered alike" in capsys.readouterr().out


def test_check_turns_on_real_and_strict_templates(tokenizer_dir):
    from pack.templates import Renderer
    from pack.tokenize.loading import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    assert sanity.check_turns(Renderer(tok, "messages"), None, False) == {"distinct": True}
    strict = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('alternate') }}{% endif %}{{ m['content'] }}{% endfor %}")
    assert sanity.check_turns(Renderer(tok, "messages", chat_template=strict), None, False) \
        == {"distinct": True}  # it refuses an assistant turn first: it reads the roles
    assert sanity.check_turns(Renderer(tok, "text"), None, False) is None
    with pytest.raises(PacktrainError, match="the tokenizer's chat template: "):
        sanity.check_turns(Renderer(tok, "messages", chat_template=ROLE_BLIND), None, False)


def test_clean_data_fires_nothing(chat_shards, capsys):
    m = F.read_manifest(chat_shards)
    c = m["checks"]
    assert c["no_labels"]["count"] == c["double_bos"]["count"] == 0
    assert c["no_labels"]["first_records"] == c["double_bos"]["first_records"] == []
    assert c["truncated"]["count"] == m["stats"]["truncated"]  # long conversations at 512
    assert c["turns"] == {"distinct": True}
    assert info_main([str(chat_shards)]) == 0
    out = capsys.readouterr().out
    assert "no labels     none" in out and "doubled BOS   none" in out
    assert "WARNING" not in out


def test_schema_matches_the_module(whole):
    schema = json.loads(F.read_schema("manifest.schema.json"))
    assert schema["$defs"]["record_check"]["properties"]["first_records"]["maxItems"] \
        == sanity.FIRST
    jsonschema.validate(F.read_manifest(whole), schema)
    bad = F.read_manifest(whole)
    bad["checks"]["no_labels"]["count"] = -1
    with pytest.raises(F.FormatError, match="checks.no_labels.count"):
        F.validate_manifest(bad)
