"""A transformers-free view of a local fast tokenizer, so that pack-build starts tokenizing at once.

Importing transformers and building its tokenizer object costs two to three seconds of a build's
start-up, on one core, before any worker can start. Rendering and tokenizing need much less: the
``tokenizers`` backend, the named special tokens and the chat template. :func:`load_lite` reads
those from ``tokenizer.json`` and ``tokenizer_config.json`` the way transformers loads the
generic fast tokenizer class, and returns None for anything it does not model (a model-specific
class, ``auto_map``, options that change tokenization); those load through transformers.

A lite view is never trusted on its own. :func:`compare` checks it against transformers' own
tokenizer: the manifest's tokenizer record (vocabulary, special tokens, chat template,
fingerprint), and the token ids and labels both give for real records of the build. pack-build
runs that check beside its workers the first time it meets a tokenizer, and builds again through
transformers if anything differs; a passed check is remembered in a small cache keyed by the
content of the tokenizer's files and the versions of the libraries involved
(:func:`check_key`, :func:`cached_record`, :func:`remember`), so later builds skip transformers
altogether. The cache lives in packtrain's cache directory (``$PACKTRAIN_CACHE``, default
``~/.cache/packtrain``), under ``tokenizer-checks/``;
``PACKTRAIN_FAST_TOKENIZER=0`` turns the lite view off.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# The named special tokens, in the order transformers keeps them (SPECIAL_TOKENS_ATTRIBUTES).
NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")
# tokenizer_config.json keys that change nothing pack-build computes. Any other key (e.g.
# add_prefix_space, legacy, split_special_tokens, extra special tokens) sends the tokenizer
# through transformers.
_INERT_KEYS = {"backend", "tokenizer_class", "model_max_length", "clean_up_tokenization_spaces",
               "model_input_names", "padding_side", "truncation_side", "added_tokens_decoder",
               "chat_template", "add_bos_token", "add_eos_token", "name_or_path",
               "extra_special_tokens", "additional_special_tokens", *NAMED_SPECIALS}
_CHECK_VERSION = 2  # bump when what compare() checks changes: older cache entries stop matching


def enabled() -> bool:
    return os.environ.get("PACKTRAIN_FAST_TOKENIZER", "1").strip().lower() not in (
        "0", "false", "no", "off")


class LiteTokenizer:
    """What pack needs of a Hugging Face fast tokenizer, read without transformers. Anything
    else (``apply_chat_template`` for messages that are not plain strings) goes to the full
    transformers tokenizer, loaded on first use."""

    is_lite = True

    def __init__(self, path: Path, backend, config: dict[str, Any], chat_template: str | None):
        self.path = path
        self._tokenizer = backend
        self.name_or_path = str(path) if path.is_dir() else ""
        self.chat_template = chat_template
        named = {}
        for attr in NAMED_SPECIALS:
            value = config.get(attr)
            if isinstance(value, dict):  # AddedToken serialised as {"content": ..., ...}
                value = value.get("content")
            if value:
                named[attr] = str(value)
        self._named = named
        self._full = None

    # ---- special tokens, as the transformers object reports them
    @property
    def special_tokens_map(self) -> dict[str, str]:
        return dict(self._named)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self._named.values()))

    @property
    def added_tokens_decoder(self) -> dict[int, Any]:
        return self._tokenizer.get_added_tokens_decoder()

    def _id(self, attr: str) -> int | None:
        tok = self._named.get(attr)
        return None if tok is None else self._tokenizer.token_to_id(tok)

    def __getattr__(self, name: str):
        # bos_token, eos_token, ..., and their *_id
        if name.endswith("_token_id") and name[:-3] in NAMED_SPECIALS:
            return self._id(name[:-3])
        if name in NAMED_SPECIALS:
            return self.__dict__.get("_named", {}).get(name)
        raise AttributeError(name)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    # ---- everything else: transformers' own object
    def full(self):
        if self._full is None:
            from .tokenize.loading import load_tokenizer

            self._full = load_tokenizer(self.path)
        return self._full

    def apply_chat_template(self, *args, **kwargs):
        return self.full().apply_chat_template(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.full()(*args, **kwargs)

    def __getstate__(self):  # workers started with spawn load their own copy
        return {"path": str(self.path)}

    def __setstate__(self, state):
        other = load_lite(state["path"])
        if other is None:
            raise RuntimeError(f"{state['path']}: the tokenizer changed while building")
        self.__dict__.update(other.__dict__)


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_lite(path: str | os.PathLike) -> LiteTokenizer | None:
    """The lite view of a tokenizer directory (generic fast class) or a bare tokenizer.json, or
    None when this module does not model it (transformers then loads it)."""
    from .tokenize.loading import _GENERIC_TOKENIZER_CLASSES

    if not enabled():
        return None
    p = Path(path)
    try:
        if p.is_file() and p.suffix == ".json":
            config: dict[str, Any] = {}
            tok_file, template = p, None
        elif p.is_dir():
            config = _read_json(p / "tokenizer_config.json")
            if not isinstance(config, dict) or config.get("tokenizer_class") not in \
                    _GENERIC_TOKENIZER_CLASSES or set(config) - _INERT_KEYS:
                return None
            if config.get("extra_special_tokens") or config.get("additional_special_tokens"):
                return None
            if (p / "special_tokens_map.json").exists() or (p / "added_tokens.json").exists() \
                    or (p / "chat_template.json").exists() or (p / "additional_chat_templates").exists():
                return None
            tok_file = p / "tokenizer.json"
            template = config.get("chat_template")
            jinja = p / "chat_template.jinja"
            if jinja.is_file():
                if template is not None:
                    return None  # two templates: let transformers decide which wins
                template = jinja.read_text(encoding="utf-8")
            if template is not None and not isinstance(template, str):
                return None  # several named templates
        else:
            return None
        if not tok_file.is_file():
            return None
        from tokenizers import AddedToken, Tokenizer

        backend = Tokenizer.from_file(str(tok_file))
    except Exception:  # unreadable or unusual: transformers loads it and names any problem
        return None
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    # pack encodes with add_special_tokens=False and never reads offsets, where every built-in
    # post-processor leaves the ids alone (ByteLevel trims offsets, TemplateProcessing adds
    # nothing): skipping it saves about 5% of the tokenizer's CPU. compare() checks the ids.
    backend.post_processor = None
    lite = LiteTokenizer(p, backend, config, template)
    added = {int(k): v for k, v in (config.get("added_tokens_decoder") or {}).items()}
    have = backend.get_added_tokens_decoder()
    for i, spec in added.items():
        tok = have.get(i)
        if tok is None or tok.content != spec.get("content") or \
                bool(tok.special) != bool(spec.get("special")):
            return None  # transformers would add or change tokens: not modelled
    missing = [t for t in lite.special_tokens_map.values() if backend.token_to_id(t) is None]
    if missing:  # transformers adds named special tokens the vocabulary lacks, in this order
        backend.add_tokens([AddedToken(t, special=True) for t in dict.fromkeys(missing)])
    return lite


# ---------------------------------------------------------------- the check and its cache

def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"check": str(_CHECK_VERSION)}
    for pkg in ("packtrain", "transformers", "tokenizers", "jinja2"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = ""
    return out


def check_key(path: str | os.PathLike, chat_template: str | None) -> str:
    """sha256 over the tokenizer's files, the --chat-template text and the library versions."""
    p = Path(path)
    h = hashlib.sha256(json.dumps(_versions(), sort_keys=True).encode())
    h.update(b"\0template\0" + (chat_template or "").encode())
    files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file())
    for f in files:
        h.update(b"\0file\0" + f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    h.update(b"\0path\0" + str(path).encode())  # the record names the path as given
    return h.hexdigest()


def _entry(key: str) -> Path:
    from .remote import cache_root

    return cache_root() / "tokenizer-checks" / f"{key}.json"


def cached_record(key: str) -> dict[str, Any] | None:
    """The tokenizer record a passed check stored under ``key``, or None."""
    try:
        data = _read_json(_entry(key))
    except (OSError, ValueError):
        return None
    rec = data.get("record") if isinstance(data, dict) else None
    return rec if isinstance(rec, dict) and data.get("key") == key else None


def remember(key: str, record: dict[str, Any]) -> None:
    """Store a passed check; a cache that cannot be written is only a slower next build."""
    path = _entry(key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"key": key, "record": record}, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass


def compare(lite: LiteTokenizer, path: str, renderer_args: dict[str, Any],
            records: list[dict]) -> tuple[str | None, dict[str, Any] | None]:
    """Check ``lite`` against transformers' tokenizer for the same path: ``(None, record)``
    when they agree (``record`` is the manifest's tokenizer entry, from transformers' object),
    else ``(what differs, None)``. ``renderer_args`` are the build's Renderer arguments and
    ``records`` a few of its records: both renderers must give them the same ids and labels."""
    import numpy as np

    from .errors import PacktrainError
    from .tokenize.loading import load_tokenizer, tokenizer_record
    from .templates import Renderer

    try:
        full = load_tokenizer(path)
    except PacktrainError as e:
        return f"transformers cannot load it ({e})", None
    rec_full = tokenizer_record(full, path)
    rec_lite = tokenizer_record(lite, path)
    if rec_full != rec_lite:
        diff = sorted(k for k in rec_full if rec_full.get(k) != rec_lite.get(k))
        return f"tokenizer record differs in {', '.join(diff)}", None
    if set(full.all_special_tokens) != set(lite.all_special_tokens):
        return "special tokens differ", None
    specials = {i: str(t) for i, t in full.added_tokens_decoder.items() if t.special}
    if specials != {i: str(t) for i, t in lite.added_tokens_decoder.items() if t.special}:
        return "added special tokens differ", None
    probe = (" hello  world\n\t" + "".join(sorted(set(lite.special_tokens_map.values())))
             + " caf\u00e9 \u4e2d\u6587 \U0001F600 1234567 <|x|> [INST] </s>")
    ids = [e.ids for e in lite._tokenizer.encode_batch_fast([probe], add_special_tokens=False)]
    if ids != [full._tokenizer.encode(probe, add_special_tokens=False).ids]:
        return "token ids of a probe text differ", None
    try:
        mine = Renderer(lite, **renderer_args)
        theirs = Renderer(full, **renderer_args, reuse_head_tokens=False)  # every text whole
        theirs.verify_all = True  # every record rendered by apply_chat_template too
    except PacktrainError as e:
        return f"renderer set-up differs ({e})", None
    if mine.template == "chat":
        conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
        for agp in (False, True):
            if _render(lambda: mine._jinja(conv, agp)) != _render(
                    lambda: full.apply_chat_template(conv, tokenize=False,
                                                     chat_template=mine.chat_template,
                                                     add_generation_prompt=agp)):
                return "the chat template renders differently", None
    a, b = mine.encode_batch(records), theirs.encode_batch(records)
    for x, y in zip(a, b):
        if isinstance(x, BaseException) or isinstance(y, BaseException):
            if type(x) is not type(y) or str(x) != str(y):
                return "a record is refused by one renderer only", None
        elif not (np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])):
            return "token ids or labels of a record differ", None
    return None, rec_full


def _render(fn) -> str | tuple[str]:
    try:
        return fn()
    except Exception:  # a template may refuse the probe conversation: both must then refuse
        return ("refused",)
