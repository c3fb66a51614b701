"""Render a record into text segments and token ids with a loss mask.

API (used by ``pack.build``)::

    r = Renderer(tokenizer, fmt, template, train_on_prompt=False, chat_template=None)
    r.segments(record)       -> [(text, trained), ...]    raises PacktrainError / NothingToTrain
    r.encode_batch(records)  -> [(input_ids int32, labels int32) | PacktrainError, ...]

``fmt`` is the record format (``alpaca`` | ``messages`` | ``text``), ``template`` how it is
rendered:

``alpaca``  the Stanford Alpaca prompt, word for word (``PROMPT_INPUT`` / ``PROMPT_NO_INPUT``), the
            response right after ``### Response:`` and then the EOS token, as Stanford's train.py
            builds ``source + target``. Optional ``system`` is prepended (``system + "\\n\\n"``);
            optional ``history`` (``[[instruction, output], ...]``) is rendered before, each earlier
            turn a full no-input prompt + output + EOS, its output trained too. BOS first when the
            tokenizer has one (and it differs from EOS). ``messages`` records may use it when they
            hold one user and one assistant turn (and an optional system message).
``chat``    the tokenizer's chat template (or ``chat_template=``, a template string or a file path).
            Roles system/user/assistant (ShareGPT ``from``: system/human/gpt, also user/assistant).
            Each assistant turn's content is trained together with the template's end-of-turn text
            right after it: a special token right after the content (``<|eot_id|>``,
            ``<|im_end|>``), else the template's closing of a final turn through its first special
            token, or without trailing whitespace when it holds none (``<|im_end|>`` of ChatML on
            a tokenizer without that token). Headers, system and user turns are not trained.
            The text is exactly ``tokenizer.apply_chat_template(messages, tokenize=False)``. ``alpaca`` records go
            through it as messages ``[system?], (history user/assistant)*, user, assistant``,
            the last user turn ``instruction`` or ``instruction + "\\n\\n" + input``.
``none``    ``text`` records: BOS (as above) + text + EOS, all trained.

``train_on_prompt=True`` trains every segment. Whatever the template, ``labels[0]`` is -100.

Nothing to train: a record whose response is empty (alpaca ``output`` blank, no assistant turn or
only blank assistant turns, empty ``text``) raises :class:`NothingToTrain`, a PacktrainError
subclass with ``.reason`` (``"empty-response"``, ``"no-assistant-turn"``, ``"empty-text"``). The
builder drops such a record and counts ``dropped[e.reason]``; check ``isinstance(e,
NothingToTrain)`` *before* treating a PacktrainError as fatal. Other PacktrainErrors name the field
(``field output: expected a string, got number``); the caller prefixes ``FILE:LINE: ``.

Chat rendering is cheap: for each role sequence the template is rendered once, with placeholder
contents wrapped in punctuation, inner whitespace and non-ASCII text; when every wrapped
placeholder comes back untouched, the fixed text between them is cached and records are assembled
by concatenation (a template that changes them is rendered again with bare placeholders). Renders
call the template compiled as transformers compiles it, with apply_chat_template's variables
(the first render is compared with apply_chat_template itself). An assembled text is checked against a real
render (one render, linear) for the first ``VERIFY_FIRST`` records of each role sequence, for
every record of a sequence whose probe came out changed (``| upper``, ``replace``, escaping), and
for every record whose contents are empty, have leading/trailing whitespace (``| trim``), or
contain a string constant of the template (``</think>``, ``<tool_response>``: things a template
can test). When the check fails, the real render is split along the cached fixed text (contents
trimmed or cut); what cannot be split that way is placed by exact prefix rendering (quadratic,
rare: e.g. Qwen3 reasoning in the last turn, which is then trained). A record that a template
renders differently when cut after a turn *and* that cannot be split raises PacktrainError.
``verify_all=True`` checks every record. Only ``role`` and ``content`` of a message reach the
template; other keys (``name``, ``tool_calls``, ``weight``) are ignored.

Tokenization: all segments of a batch go to the Rust tokenizer in one ``encode_batch_fast`` call
(no special tokens added; special-token strings in the text, such as ``<|eot_id|>`` in the
template text, become their single ids), and the ids of a record are its segments' ids back to
back, so the label boundaries are exact. Fixed template text at a segment's ends (Alpaca's
header, a chat template's text up to and from its special tokens) is tokenized once and its ids
reused where that is exact (:mod:`pack.tokenize.head_tokens`, :mod:`pack.tokenize.fixed_pieces`). The Rust call
uses all cores unless ``TOKENIZERS_PARALLELISM=false``: set that in worker processes when
running several.

Workers: a Renderer pickles (its tokenizer pickles; caches are dropped) but a tokenizer is a
~7 MB pickle, so prefer ``Renderer.from_config(renderer.config(), tokenizer)`` in each worker,
with the tokenizer loaded there by ``pack.tokenize.loading.load_tokenizer``. ``config()`` is a small
JSON-able dict holding the resolved chat template text.
"""

from __future__ import annotations

import os
import re
from itertools import chain
from typing import Any, Iterable

import numpy as np

from .tokenize import encode_thread, fixed_pieces, head_tokens
from .errors import PacktrainError
from .format import IGNORE_INDEX

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

TEMPLATES = ("alpaca", "chat", "none")
DEFAULT_TEMPLATE = {"alpaca": "alpaca", "messages": "chat", "text": "none"}
ALLOWED = {"alpaca": ("alpaca", "chat"), "messages": ("chat", "alpaca"), "text": ("none",)}
ROLES = ("system", "user", "assistant")
_ROLE_SET = frozenset(ROLES)
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}
VERIFY_FIRST = 1
_LAYOUT_CACHE_MAX = 8192
_PH = "PKTPH{:06d}Z"  # placeholder content: alphanumeric, no whitespace
_PH_RE = re.compile(r"PKTPH\d{6}Z")
# A second placeholder render wraps each placeholder in these characters (no whitespace at the
# ends, which records are checked for anyway): a template that changes any of them (replace,
# escape, upper/capitalize, ...) gets every record of that role sequence checked.
_PROBE = "a \n\t\r\u3000\xa0Z9\u00e9\U0001F600\u4e2d<'\"&>{}[]()%#\\/|~`*_.,;:!?-+=$@^b"


class NothingToTrain(PacktrainError):
    """The record has no response to learn from; the builder drops and counts it by ``reason``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _jtype(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, (list, tuple)):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _field_error(field: str, what: str) -> PacktrainError:
    return PacktrainError(f"field {field}: {what}")


def _req_str(record: dict, key: str, field: str | None = None) -> str:
    field = field or key
    if key not in record:
        raise _field_error(field, "missing")
    v = record[key]
    if not isinstance(v, str):
        raise _field_error(field, f"expected a string, got {_jtype(v)}")
    return v


def _opt_str(record: dict, key: str) -> str:
    v = record.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise _field_error(key, f"expected a string, got {_jtype(v)}")
    return v


def _not_text_error() -> PacktrainError:
    e = _field_error("record", "a string holds a lone UTF-16 surrogate (an unpaired "
                               "\\ud800-\\udfff escape), which is not Unicode text; fix the "
                               "record")
    e.reason = "invalid-unicode"  # type: ignore[attr-defined]
    return e


def _records_not_text(owners: list[int], texts: list[str], nsegs: list) -> set[int]:
    """Records (of ``owners``, each with ``nsegs[i]`` consecutive ``texts``) holding a string
    that cannot be encoded as UTF-8."""
    bad, k = set(), 0
    for i in owners:
        n = nsegs[i]
        for t in texts[k:k + n]:
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                bad.add(i)
                break
        k += n
    return bad


def _merge(segs: Iterable[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Join neighbours with the same flag; drop empty texts."""
    out: list[tuple[str, bool]] = []
    for text, flag in segs:
        if not text:
            continue
        if out and out[-1][1] == flag:
            out[-1] = (out[-1][0] + text, flag)
        else:
            out.append((text, flag))
    return out


class _Layout:
    """The fixed text of one role sequence: ``pieces[0] c0 pieces[1] c1 ... pieces[n]`` and, per
    message j, how many leading characters of ``pieces[j + 1]`` are trained with it."""

    __slots__ = ("pieces", "close", "checked", "always_verify")

    def __init__(self, pieces: list[str], close: list[int]):
        self.pieces, self.close = pieces, close
        self.checked = 0
        self.always_verify = False


_NO_LAYOUT = object()


class Renderer:
    """Record -> segments -> (input_ids, labels). See the module docstring."""

    def __init__(self, tokenizer, fmt: str, template: str | None = None,
                 train_on_prompt: bool = False, chat_template: str | None = None, *,
                 add_bos: bool | None = None, verify_all: bool = False,
                 reuse_head_tokens: bool = True):
        if fmt not in ALLOWED:
            raise PacktrainError(f"unknown record format {fmt!r}; use alpaca, messages or text")
        if template in (None, "", "auto"):
            template = DEFAULT_TEMPLATE[fmt]
        if template not in TEMPLATES:
            raise PacktrainError(f"unknown template {template!r}; use alpaca, chat or none")
        if template not in ALLOWED[fmt]:
            raise PacktrainError(f"--template {template} cannot render {fmt} records; use "
                                 f"{' or '.join(ALLOWED[fmt])}")
        self.tokenizer = tokenizer
        self.fmt, self.template = fmt, template
        self.train_on_prompt = bool(train_on_prompt)
        self.verify_all = bool(verify_all)
        self.reuse_head_tokens = bool(reuse_head_tokens)  # same ids either way; see head_tokens
        self.bos = tokenizer.bos_token or ""
        self.eos = tokenizer.eos_token or ""
        if add_bos is None:
            add_bos = bool(self.bos) and self.bos != self.eos
        self.add_bos = bool(add_bos)
        if not self.add_bos:
            self.bos = ""
        if template in ("alpaca", "none") and not self.eos:
            raise PacktrainError("the tokenizer has no eos_token, needed to end each sample; "
                                 "use a tokenizer that defines one")
        self.chat_template: str | None = None
        if template == "chat":
            self.chat_template = self._resolve_chat_template(chat_template)
        self._init_caches()

    # ------------------------------------------------------------ set-up, pickling

    def _resolve_chat_template(self, chat_template: str | None) -> str:
        if chat_template:
            if "{" not in chat_template and os.path.isfile(chat_template):
                with open(chat_template, encoding="utf-8") as f:
                    return f.read()
            return chat_template
        t = getattr(self.tokenizer, "chat_template", None)
        if isinstance(t, dict):
            t = t.get("default")
        if not t:
            raise PacktrainError("the tokenizer has no chat template; pass --chat-template FILE "
                                 "(a Jinja chat template) or use --template alpaca")
        return t

    def _init_caches(self) -> None:
        self._layouts: dict[tuple[str, ...], Any] = {}
        self._special_re = None
        self._marker_re: tuple[str, ...] = ()
        self._closing: str | None = None
        self._backend = getattr(self.tokenizer, "_tokenizer", None)
        if self._backend is not None and getattr(self._backend, "encode_special_tokens", False):
            self._backend = None  # it would split special tokens: use the Python path
        self._jinja = None
        self._jinja_checked = False  # set by _compile_direct
        self._heads: list[head_tokens.Head] | None = None  # made on first use
        # Fixed template texts whose ids may be reused at segment ends (pack/fixed_pieces.py):
        # BOS/EOS now, each layout's pieces as it is made; the tables are remade when it grows.
        self._fixed_texts: dict[str, None] = dict.fromkeys(t for t in (self.bos, self.eos) if t)
        self._reuse: tuple[list[head_tokens.Head], list[fixed_pieces.Tail]] | None = None
        self._pieces_usable: bool | None = None
        if self.template == "chat":
            self._special_re = self._compile_specials()
            self._marker_re = self._compile_markers()
            self._jinja = self._compile_direct()

    def _compile_direct(self):
        """The chat template compiled in :mod:`pack.chat_env` (transformers' environment, rebuilt)
        with the variables apply_chat_template gives it. Rendering through it directly
        skips apply_chat_template's per-call message normalisation (over half of a render's
        cost for plain-string messages) and needs no transformers import. Its first render is
        compared with apply_chat_template's and it is dropped on any difference, so the text
        stays exactly the tokenizer's; a tokenizer view from :mod:`pack.fast_tokenizer` is
        checked by the build instead (``is_lite``)."""
        from jinja2 import TemplateSyntaxError

        from .chat_env import compile_chat_template, template_variables

        try:
            compiled = compile_chat_template(self.chat_template)
            variables = template_variables(dict(self.tokenizer.special_tokens_map))
        except TemplateSyntaxError as e:
            raise PacktrainError(f"the chat template is not valid Jinja ({e}); fix it or pass "
                                 f"--chat-template FILE") from None
        self._jinja_checked = bool(getattr(self.tokenizer, "is_lite", False))
        return lambda conv, agp: compiled.render(messages=conv, tools=None, documents=None,
                                                 add_generation_prompt=agp, **variables)

    def config(self) -> dict[str, Any]:
        """A small JSON-able dict that, with the same tokenizer, re-creates this Renderer."""
        return dict(fmt=self.fmt, template=self.template, train_on_prompt=self.train_on_prompt,
                    chat_template=self.chat_template, add_bos=self.add_bos,
                    verify_all=self.verify_all)

    @classmethod
    def from_config(cls, config: dict[str, Any], tokenizer) -> "Renderer":
        return cls(tokenizer, config["fmt"], config["template"],
                   train_on_prompt=config.get("train_on_prompt", False),
                   chat_template=config.get("chat_template"), add_bos=config.get("add_bos"),
                   verify_all=config.get("verify_all", False))

    def __getstate__(self):
        state = self.__dict__.copy()
        for k in ("_layouts", "_special_re", "_marker_re", "_closing", "_backend", "_jinja",
                  "_jinja_checked", "_heads"):
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_caches()

    def _compile_specials(self):
        tok = self.tokenizer
        specials = set(getattr(tok, "all_special_tokens", []) or [])
        try:
            for added in tok.added_tokens_decoder.values():
                if getattr(added, "special", False):
                    specials.add(str(added))
        except AttributeError:  # pragma: no cover - slow tokenizers
            pass
        specials = sorted((s for s in specials if s), key=len, reverse=True)
        return re.compile("|".join(map(re.escape, specials))) if specials else None

    def _compile_markers(self):
        """String constants of the template (but role names and subscript keys) that a content
        may contain and the template may test (``'</think>' in content``): contents holding one
        are always checked."""
        from jinja2 import nodes

        from .chat_env import environment

        try:  # the chat environment knows its extensions ({% generation %}, loop controls)
            ast = environment().parse(self.chat_template)
        except Exception as e:  # jinja2.TemplateSyntaxError
            raise PacktrainError(f"the chat template is not valid Jinja ({e}); fix it or pass "
                                 f"--chat-template FILE") from None
        keys = {id(n.arg) for n in ast.find_all(nodes.Getitem)}
        markers = set()
        for node in ast.find_all(nodes.Const):
            v = node.value
            if isinstance(v, str) and id(node) not in keys:
                v = v.strip()
                if len(v) >= 2 and v not in _ROLE_SET:
                    markers.add(v)
        markers = sorted(markers, key=len, reverse=True)
        return tuple(markers)

    # ------------------------------------------------------------ records -> messages

    def _messages(self, record: dict) -> list[tuple[str, str]]:
        """Validated (role, content) pairs of a messages record (OpenAI or ShareGPT)."""
        if "messages" in record:
            key, rk, ck, names = "messages", "role", "content", None
        elif "conversations" in record:
            key, rk, ck, names = "conversations", "from", "value", SHAREGPT_ROLES
        else:
            raise _field_error("messages", "missing (expected 'messages' or 'conversations')")
        msgs = record[key]
        if not isinstance(msgs, list):
            raise _field_error(key, f"expected an array of messages, got {_jtype(msgs)}")
        if not msgs:
            raise _field_error(key, "empty conversation")
        if names is None:  # fast path for well-formed OpenAI messages; errors take the slow one
            try:
                out = [(m["role"], m["content"]) for m in msgs]
            except (KeyError, TypeError):
                out = None
            if out is not None and all(r in _ROLE_SET and type(c) is str for r, c in out):
                return out
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise _field_error(f"{key}[{i}]", f"expected an object, got {_jtype(m)}")
            if rk not in m and names is not None and "role" in m:
                rk, ck, names = "role", "content", None  # ShareGPT key with OpenAI messages
            role = _req_str(m, rk, f"{key}[{i}].{rk}")
            if names is None:
                if role not in ROLES:
                    raise _field_error(f"{key}[{i}].{rk}", f"unknown role {role!r}; use system, "
                                                          f"user or assistant")
            else:
                if role not in names:
                    raise _field_error(f"{key}[{i}].{rk}", f"unknown role {role!r}; use system, "
                                                          f"human or gpt")
                role = names[role]
            out.append((role, _req_str(m, ck, f"{key}[{i}].{ck}")))
        return out

    def _alpaca_parts(self, record: dict) -> tuple[str, list[tuple[str, str, str]]]:
        """(system, [(instruction, input, output), ...]) with history first."""
        instruction = _req_str(record, "instruction")
        output = _req_str(record, "output")
        inp = _opt_str(record, "input")
        system = _opt_str(record, "system")
        turns = []
        hist = record.get("history")
        if hist is not None:
            if not isinstance(hist, list):
                raise _field_error("history", f"expected an array of [instruction, output] pairs, "
                                              f"got {_jtype(hist)}")
            for i, pair in enumerate(hist):
                if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                    raise _field_error(f"history[{i}]", "expected [instruction, output]")
                for k, v in enumerate(pair):
                    if not isinstance(v, str):
                        raise _field_error(f"history[{i}][{k}]",
                                           f"expected a string, got {_jtype(v)}")
                turns.append((pair[0], "", pair[1]))
        turns.append((instruction, inp, output))
        if not output.strip():
            raise NothingToTrain("empty-response", "field output: empty response, nothing to "
                                                   "train on")
        return system, turns

    def _messages_as_alpaca(self, record: dict) -> dict:
        msgs = self._messages(record)
        system = ""
        if msgs and msgs[0][0] == "system":
            system, msgs = msgs[0][1], msgs[1:]
        if [r for r, _ in msgs] != ["user", "assistant"]:
            raise _field_error("messages", "the alpaca template takes one user and one assistant "
                                           "turn (plus an optional system message); use "
                                           "--template chat for multi-turn conversations")
        return {"system": system, "instruction": msgs[0][1], "output": msgs[1][1]}

    def _alpaca_as_messages(self, record: dict) -> list[tuple[str, str]]:
        system, turns = self._alpaca_parts(record)
        msgs = [("system", system)] if system else []
        for instruction, inp, output in turns:
            msgs.append(("user", instruction + ("\n\n" + inp if inp else "")))
            msgs.append(("assistant", output))
        return msgs

    # ------------------------------------------------------------ segments

    def segments(self, record: dict) -> list[tuple[str, bool]]:
        """The rendered text as consecutive ``(text, trained)`` segments (neighbours with equal
        flags joined). Raises PacktrainError naming the field, or NothingToTrain."""
        if not isinstance(record, dict):
            raise PacktrainError(f"record: expected an object, got {_jtype(record)}")
        if self.template == "chat":
            msgs = self._alpaca_as_messages(record) if self.fmt == "alpaca" \
                else self._messages(record)
            segs = self._chat_segments(msgs)
        elif self.template == "alpaca":
            if self.fmt == "messages":
                record = self._messages_as_alpaca(record)
            segs = self._alpaca_segments(record)
        else:
            text = _req_str(record, "text")
            if not text.strip():
                raise NothingToTrain("empty-text", "field text: empty, nothing to train on")
            segs = [(self.bos, False), (text + self.eos, True)]
        if self.train_on_prompt:
            return [("".join(t for t, _ in segs), True)]
        return _merge(segs)

    def _alpaca_segments(self, record: dict) -> list[tuple[str, bool]]:
        system, turns = self._alpaca_parts(record)
        segs = [(self.bos + (system + "\n\n" if system else ""), False)]
        for instruction, inp, output in turns:
            prompt = (PROMPT_INPUT.format(instruction=instruction, input=inp) if inp
                      else PROMPT_NO_INPUT.format(instruction=instruction))
            segs.append((prompt, False))
            segs.append((output + self.eos, True))
        return segs

    # ------------------------------------------------------------ chat

    def render(self, msgs: list[tuple[str, str]] | list[dict],
               add_generation_prompt: bool = False) -> str:
        """The chat template's text for messages (pairs or dicts), as apply_chat_template."""
        conv = [m if isinstance(m, dict) else {"role": m[0], "content": m[1]} for m in msgs]
        try:
            if self._jinja is not None and conv and all(
                    type(m.get("content")) is str and type(m.get("role")) is str and len(m) == 2
                    for m in conv):
                text = self._jinja(conv, add_generation_prompt)
                if self._jinja_checked:
                    return text
                self._jinja_checked = True
                if text == self._apply(conv, add_generation_prompt):
                    return text
                self._jinja = None
            return self._apply(conv, add_generation_prompt)
        except PacktrainError:
            raise
        except Exception as e:  # jinja2 errors, raise_exception() in templates, ValueError
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise _field_error("messages", f"the chat template rejected this conversation "
                                           f"({msg})") from None

    def _apply(self, conv: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            conv, tokenize=False, chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt)

    def _trained_close(self, closing: str) -> int:
        """How many leading characters of a turn's closing text are trained."""
        if self._special_re is not None:
            m = self._special_re.search(closing)
            if m:
                return m.end()
        return len(closing.rstrip())

    def _close_len(self, after: str, closing: str) -> int:
        """How much of the text after an assistant content is trained with it: through a special
        token that follows the content at once (``<|eot_id|>``, ``<|im_end|>``); otherwise
        through the first special token of the part shared with the template's closing of a
        final turn, or all of that closing but trailing whitespace when it is shared whole."""
        if self._special_re is not None:
            m = self._special_re.match(after)
            if m:
                return m.end()
        common = os.path.commonprefix([after, closing])
        if self._special_re is not None:
            m = self._special_re.search(common)
            if m:
                return m.end()
        return len(common.rstrip()) if common == closing else 0

    def _closing_text(self) -> str:
        """What the template writes right after the content of a final assistant turn."""
        if self._closing is None:
            ph1 = _PH.format(1)
            try:
                text = self.render([("user", _PH.format(0)), ("assistant", ph1)])
                self._closing = text[text.index(ph1) + len(ph1):] if text.count(ph1) == 1 else ""
            except PacktrainError:
                self._closing = ""
        return self._closing

    def _layout(self, roles: tuple[str, ...]):
        lay = self._layouts.get(roles)
        if lay is not None:
            return lay
        if len(self._layouts) >= _LAYOUT_CACHE_MAX:
            self._layouts.clear()
        lay = self._build_layout(roles)
        self._layouts[roles] = lay
        return lay

    def _build_layout(self, roles: tuple[str, ...]):
        phs = [_PH.format(i) for i in range(len(roles))]
        lay = self._probed_layout(roles, phs)
        if lay is None:
            lay = self._plain_layout(roles, phs)
        if lay is _NO_LAYOUT:
            return lay
        closing = self._closing_text()
        for j, role in enumerate(roles):
            lay.close.append(self._close_len(lay.pieces[j + 1], closing)
                             if role == "assistant" else 0)
        self._add_fixed_texts(lay)
        return lay

    def _add_fixed_texts(self, lay: _Layout) -> None:
        """Offer a layout's fixed text, as it falls into segments, for id reuse."""
        parts = [lay.pieces[0]]
        for j, k in enumerate(lay.close):
            nxt = lay.pieces[j + 1]
            parts += [nxt[:k], nxt[k:]] if k else [nxt]
        new = [t for t in parts if t and t not in self._fixed_texts]
        if new and len(self._fixed_texts) < 4 * fixed_pieces.MAX_TEXTS:
            self._fixed_texts.update(dict.fromkeys(new))
            self._reuse = None

    @staticmethod
    def _split_pieces(text: str, marks: list[str]) -> list[str] | None:
        """The text around each mark, when every mark occurs exactly once, in order. Each mark
        holds exactly one placeholder, so one scan for placeholders decides it (counting every
        mark in the text was quadratic in the length of long conversations)."""
        found = list(_PH_RE.finditer(text))
        if len(found) != len(marks):
            return None
        pieces, pos = [], 0
        for mark, m in zip(marks, found):
            k = mark.find(m.group())  # -1: the placeholders come back out of order
            start = m.start() - k
            if k < 0 or start < pos or not text.startswith(mark, start):
                return None
            pieces.append(text[pos:start])
            pos = start + len(mark)
        pieces.append(text[pos:])
        return pieces

    def _probed_layout(self, roles: tuple[str, ...], phs: list[str]):
        """One render with each placeholder wrapped in _PROBE: when every wrapped placeholder
        comes back intact the template passes contents through unchanged, and the text between
        them is the layout (a template that rewrites contents fails this and takes the
        two-render path below, with every record checked)."""
        try:
            text = self.render([(r, _PROBE + ph + _PROBE) for r, ph in zip(roles, phs)])
        except PacktrainError:
            return None
        pieces = self._split_pieces(text, [_PROBE + ph + _PROBE for ph in phs])
        return _Layout(pieces, []) if pieces is not None else None

    def _plain_layout(self, roles: tuple[str, ...], phs: list[str]):
        try:
            text = self.render(list(zip(roles, phs)))
        except PacktrainError:
            return _NO_LAYOUT
        pieces = self._split_pieces(text, phs)
        if pieces is None:
            return _NO_LAYOUT  # the template drops, repeats or rewrites contents
        lay = _Layout(pieces, [])
        lay.always_verify = True  # it changed the probed contents, or failed on them
        return lay

    def _assemble(self, lay: _Layout, roles, contents, text_only: bool = False):
        """Segments of one record from its layout, neighbours with equal flags already joined
        (``text_only``: the pieces of the text, no flags)."""
        pieces, close = lay.pieces, lay.close
        if text_only:
            return [pieces[0]] + [x for pair in zip(contents, pieces[1:]) for x in pair]
        segs: list[tuple[str, bool]] = []
        run = [pieces[0]]
        for j, role in enumerate(roles):
            nxt = pieces[j + 1]
            if role == "assistant":
                k = close[j]
                head = "".join(run)
                if head:
                    segs.append((head, False))
                segs.append((contents[j] + nxt[:k], True))
                run = [nxt[k:]]
            else:
                run.append(contents[j])
                run.append(nxt)
        tail = "".join(run)
        if tail:
            segs.append((tail, False))
        return segs

    def _needs_check(self, lay: _Layout, contents: list[str]) -> bool:
        if self.verify_all or lay.always_verify or lay.checked < VERIFY_FIRST:
            return True
        return self._visible_cause(contents)

    def _visible_cause(self, contents: list[str]) -> bool:
        """Whether a template could render these contents differently from placeholders:
        empty, leading/trailing whitespace, or holding one of the template's string constants."""
        for c in contents:
            if not c or c[0].isspace() or c[-1].isspace():
                return True
        if self._marker_re:
            joined = "\x00".join(contents)
            return any(m in joined for m in self._marker_re)
        return False

    def _chat_segments(self, msgs: list[tuple[str, str]]) -> list[tuple[str, bool]]:
        roles = tuple(r for r, _ in msgs)
        contents = [c for _, c in msgs]
        asst = [c for r, c in msgs if r == "assistant"]
        if not asst:
            raise NothingToTrain("no-assistant-turn", "field messages: no assistant turn, "
                                                      "nothing to train on")
        if not any(c.strip() for c in asst):
            raise NothingToTrain("empty-response", "field messages: every assistant turn is "
                                                   "empty, nothing to train on")
        lay = self._layout(roles)
        if lay is _NO_LAYOUT:
            return self._slow_segments(msgs, self.render(msgs), None)
        segs = self._assemble(lay, roles, contents)
        if not self._needs_check(lay, contents):
            return segs
        real = self.render(msgs)
        if "".join(t for t, _ in segs) == real:
            lay.checked += 1
            return segs
        if not self._visible_cause(contents):
            lay.always_verify = True  # the template rewrites contents without a visible cause
        lay.checked += 1
        return self._slow_segments(msgs, real, lay)

    def _split_rendered(self, lay: _Layout, contents: list[str], real: str
                        ) -> list[tuple[int, int]]:
        """Find the contents as the template wrote them (trimmed, cut, ...) between the fixed
        pieces of the layout in a real render; each must be the content or a part of it.
        Returns ``(start, end)`` of the contents found, in order, up to the first one that
        cannot be found."""
        pieces = lay.pieces
        out: list[tuple[int, int]] = []
        if not real.startswith(pieces[0]):
            return out
        n = len(contents)
        pos = len(pieces[0])
        for j in range(n):
            c, nxt = contents[j], pieces[j + 1]
            if j == n - 1:
                end = len(real) - len(nxt)
                cands = [end] if real.endswith(nxt) and end >= pos else []
            else:
                cands = []
                for t in (c, c.strip(), c.lstrip(), c.rstrip()):
                    if real.startswith(t + nxt, pos):
                        cands.append(pos + len(t))
                        break
                else:
                    i = real.find(nxt, pos)
                    while i >= 0:
                        cands.append(i)
                        i = real.find(nxt, i + 1)
            for p in cands:
                if real[pos:p] in c:
                    out.append((pos, p))
                    pos = p + len(nxt)
                    break
            else:
                return out
        return out

    def _prefix_span(self, msgs: list[tuple[str, str]], i: int, real: str) -> tuple[int, int]:
        """Place assistant turn i by rendering the conversation cut before and after it; the
        cut renders must be prefixes of the whole render. Raises PacktrainError otherwise."""
        ph = _PH.format(0)
        start = None
        probe = self.render(msgs[:i] + [("assistant", ph)])
        k = probe.find(ph)
        if k >= 0 and real.startswith(probe[:k]):
            start = k
        elif i > 0:
            head = self.render(msgs[:i], add_generation_prompt=True)
            if real.startswith(head):
                start = len(head)
        upto = self.render(msgs[:i + 1])
        if start is None or not real.startswith(upto) or start > len(upto):
            raise _field_error(
                f"messages[{i}]", "the chat template renders this conversation differently when "
                                  "it is cut after this turn (it rewrites earlier turns), so the "
                                  "trained text cannot be placed; drop or fix the record, or use a "
                                  "training variant of the template")
        end = len(upto)
        closing = self._closing_text()
        if closing and real[start:end].endswith(closing):
            end -= len(closing) - self._trained_close(closing)
        return start, end

    def _slow_segments(self, msgs: list[tuple[str, str]], real: str, lay
                       ) -> list[tuple[str, bool]]:
        """Segments of a record whose assembled text differed from the real render (or whose
        role sequence has no layout): split the real render along the layout's fixed pieces as
        far as that goes, and place the remaining assistant turns by prefix rendering."""
        found = self._split_rendered(lay, [c for _, c in msgs], real) if lay is not None else []
        spans = []
        for i, (role, _) in enumerate(msgs):
            if role != "assistant":
                continue
            if i < len(found):
                s, e = found[i]
                spans.append((s, e + lay.close[i]))
            else:
                spans.append(self._prefix_span(msgs, i, real))
        segs, pos = [], 0
        for s, e in spans:
            if s < pos or e < s:
                raise _field_error("messages", "the chat template places assistant turns out of "
                                               "order, so the trained text cannot be placed; "
                                               "drop or fix the record")
            segs.append((real[pos:s], False))
            segs.append((real[s:e], True))
            pos = e
        segs.append((real[pos:], False))
        return _merge(segs)

    # ------------------------------------------------------------ tokens

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._backend is not None:
            encode = getattr(self._backend, "encode_batch_fast", None) or \
                self._backend.encode_batch
            # off the main thread: measured cheaper, see pack/encode_thread.py
            return encode_thread.call(
                lambda: [e.ids for e in encode(texts, add_special_tokens=False)])
        return encode_thread.call(
            lambda: self.tokenizer(texts, add_special_tokens=False)["input_ids"])

    def _head_tokens(self) -> list[head_tokens.Head]:
        """The Alpaca prompt headers whose tokens this renderer reuses (see
        :mod:`pack.tokenize.head_tokens`): with and without BOS, since a history turn's prompt starts a
        segment of its own."""
        if self._heads is None:
            self._heads = []
            if self.template == "alpaca" and self.reuse_head_tokens and self._backend is not None:
                fixed = [p[:p.index("{instruction}")] for p in (PROMPT_INPUT, PROMPT_NO_INPUT)]
                self._heads = head_tokens.prepare(
                    self._backend, [self.bos + f for f in fixed] + fixed, self._encode_texts)
        return self._heads

    def _reuse_tables(self) -> tuple[list[head_tokens.Head], list[fixed_pieces.Tail]]:
        """The fixed leading and trailing texts whose ids are reused, longest first: Alpaca's
        prompt headers (:mod:`pack.tokenize.head_tokens`) and template text up to or from a special
        token (:mod:`pack.tokenize.fixed_pieces`)."""
        if self._reuse is None:
            heads = list(self._head_tokens())
            tails: list[fixed_pieces.Tail] = []
            if self._pieces_usable is None:
                self._pieces_usable = (self.reuse_head_tokens and self._backend is not None
                                       and fixed_pieces.usable(self._backend))
            if self._pieces_usable:
                fronts, tails = fixed_pieces.prepare(self._backend, list(self._fixed_texts),
                                                     self._encode_texts)
                heads = sorted(heads + fronts, key=lambda h: len(h[0]), reverse=True)
            self._reuse = (heads, tails)
        return self._reuse

    def encode_batch(self, records: list[dict]) -> list[tuple[np.ndarray, np.ndarray] | Exception]:
        """One entry per record: ``(input_ids, labels)`` (int32; labels -100 where not trained,
        always at position 0) or the PacktrainError / NothingToTrain for that record. All
        segments of the batch are tokenized in one call of the fast tokenizer."""
        out, ids, labels, starts, ends = self.encode_flat(records)
        return [(ids[starts[r]:ends[r]], labels[starts[r]:ends[r]]) if isinstance(r, int) else r
                for r in out]

    def encode_flat(self, records: list[dict]) -> tuple[list[Any], np.ndarray, np.ndarray,
                                                         np.ndarray, np.ndarray]:
        """:meth:`encode_batch` without cutting the batch into per-record arrays (pack-build
        works on the flat arrays): ``(outcome, ids, labels, starts, ends)`` where outcome[i] is
        record i's exception, or k: its tokens are ``ids[starts[k]:ends[k]]``."""
        out: list[Any] = [None] * len(records)
        texts: list[str] = []
        flags: list[bool] = []
        owners: list[int] = []  # record index of each segment
        for i, rec in enumerate(records):
            try:
                segs = self.segments(rec)
            except PacktrainError as e:
                out[i] = e
                continue
            owners.append(i)
            texts.extend(t for t, _ in segs)
            flags.extend(f for _, f in segs)
            out[i] = len(segs)
        none = np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64), \
            np.zeros(0, np.int64)
        if not texts:
            return (out, *none)
        heads, tails = self._reuse_tables()
        try:
            if heads or tails:
                cut, front, back = fixed_pieces.cut(texts, heads, tails)
                ids_lists = self._encode_texts(cut)
            else:
                front = back = None
                ids_lists = self._encode_texts(texts)
        except (TypeError, ValueError, UnicodeError):
            # The fast tokenizer refuses the whole batch for one string that is not Unicode
            # text (a lone surrogate, from a JSON escape such as \ud800): refuse those records
            # and tokenize the others.
            bad = _records_not_text(owners, texts, out)
            if not bad:
                raise
            rest = self.encode_flat([None if i in bad else r for i, r in enumerate(records)])
            for i in bad:
                rest[0][i] = _not_text_error()
            return rest
        n = len(ids_lists)
        seg_lens = np.fromiter(map(len, ids_lists), dtype=np.int64, count=n)
        if front is not None:  # reused ids before and after each segment's tokenized middle
            seg_lens += np.fromiter(map(len, front), dtype=np.int64, count=n)
            seg_lens += np.fromiter(map(len, back), dtype=np.int64, count=n)
            ids_lists = chain.from_iterable(zip(front, ids_lists, back))
        total = int(seg_lens.sum())
        ids = np.fromiter(chain.from_iterable(ids_lists), dtype=np.int32, count=total)
        mask = np.repeat(np.asarray(flags, dtype=bool), seg_lens)
        labels = np.where(mask, ids, np.int32(IGNORE_INDEX)).astype(np.int32, copy=False)
        nsegs = np.fromiter((out[i] for i in owners), dtype=np.int64, count=len(owners))
        seg_end = np.cumsum(nsegs)
        tok_end_of_seg = np.concatenate([[0], np.cumsum(seg_lens)])
        rec_end = tok_end_of_seg[seg_end]
        rec_start = np.concatenate([[0], rec_end[:-1]])
        labels[rec_start[rec_end > rec_start]] = IGNORE_INDEX
        cs = np.concatenate([[0], np.cumsum(labels != IGNORE_INDEX)])
        trained = cs[rec_end] - cs[rec_start]
        for k, i in enumerate(owners):
            out[i] = k if trained[k] else NothingToTrain(
                "empty-response", "no trained tokens after tokenization, nothing to train on")
        return out, ids, labels, rec_start, rec_end
