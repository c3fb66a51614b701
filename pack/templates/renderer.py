"""``Renderer``: picks the template kind for a record format and hands its segments to the
tokenizing side (:class:`pack.tokenize.segments.SegmentEncoder`). See the package docstring."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ..errors import PacktrainError
from ..tokenize.segments import Flat, SegmentEncoder
from . import records
from .alpaca import AlpacaTemplate
from .chat import ChatTemplate
from .chat_render import resolve_source
from .preference import PreferenceTemplate
from .records import Message, NothingToTrain, Segment
from .text import TextTemplate

TEMPLATES = ("alpaca", "chat", "none")
DEFAULT_TEMPLATE = {"alpaca": "alpaca", "messages": "chat", "text": "none",
                    "preference": "chat"}
ALLOWED = {"alpaca": ("alpaca", "chat"), "messages": ("chat", "alpaca"), "text": ("none",),
           "preference": ("chat", "none")}


class TemplateKind(Protocol):
    """What a renderer of one template kind does (:mod:`.alpaca`, :mod:`.chat`, :mod:`.text`)."""

    def segments(self, record: dict) -> list[Segment]:
        """The record's ``(text, trained)`` segments; PacktrainError / NothingToTrain."""

    def head_texts(self) -> list[str]:
        """Fixed texts every record starts with, whose ids may be reused."""


def _check_choice(fmt: str, template: str | None) -> str:
    """The template to render ``fmt`` records with (``auto``: the format's default)."""
    if fmt not in ALLOWED:
        raise PacktrainError(f"unknown record format {fmt!r}; use alpaca, messages, text or "
                             f"preference")
    if template in (None, "", "auto"):
        template = DEFAULT_TEMPLATE[fmt]
    if template not in TEMPLATES:
        raise PacktrainError(f"unknown template {template!r}; use alpaca, chat or none")
    if template not in ALLOWED[fmt]:
        raise PacktrainError(f"--template {template} cannot render {fmt} records; use "
                             f"{' or '.join(ALLOWED[fmt])}")
    return template


def _no_trained_tokens() -> NothingToTrain:
    return NothingToTrain("empty-response",
                          "no trained tokens after tokenization, nothing to train on")


class Renderer:
    """Record -> segments (by the template kind) -> (input_ids, labels) (by the encoder)."""

    def __init__(self, tokenizer: Any, fmt: str, template: str | None = None,
                 train_on_prompt: bool = False, chat_template: str | None = None, *,
                 add_bos: bool | None = None, verify_all: bool = False,
                 reuse_head_tokens: bool = True):
        self.template = _check_choice(fmt, template)
        self.tokenizer, self.fmt = tokenizer, fmt
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
        if self.template in ("alpaca", "none") and not self.eos:
            raise PacktrainError("the tokenizer has no eos_token, needed to end each sample; "
                                 "use a tokenizer that defines one")
        self.chat_template: str | None = None
        self.chat: ChatTemplate | None = None
        if self.template == "chat":
            self.chat_template = resolve_source(tokenizer, chat_template)
            self.chat = ChatTemplate(tokenizer, "messages" if fmt == "preference" else fmt,
                                     self.chat_template, verify_all=self.verify_all,
                                     on_layout=self._offer_fixed_texts)
        if fmt == "preference":
            if self.train_on_prompt:
                raise PacktrainError("--train-on-prompt does not apply to preference data "
                                     "(only the completions are compared); drop the option")
            self.kind: TemplateKind = PreferenceTemplate(self.chat, self.bos, self.eos)
        elif self.chat is not None:
            self.kind = self.chat
        elif self.template == "alpaca":
            self.kind = AlpacaTemplate(fmt, self.bos, self.eos)
        else:
            self.kind = TextTemplate(self.bos, self.eos)
        self.encoder = SegmentEncoder(tokenizer, reuse=self.reuse_head_tokens,
                                      head_texts=self.kind.head_texts(),
                                      fixed_texts=(self.bos, self.eos),
                                      nothing_trained=_no_trained_tokens)

    def _offer_fixed_texts(self, texts: list[str]) -> None:
        self.encoder.offer_fixed_texts(texts)

    # ------------------------------------------------------------ workers

    def config(self) -> dict[str, Any]:
        """A small JSON-able dict that, with the same tokenizer, re-creates this Renderer."""
        return dict(fmt=self.fmt, template=self.template, train_on_prompt=self.train_on_prompt,
                    chat_template=self.chat_template, add_bos=self.add_bos,
                    verify_all=self.verify_all)

    @classmethod
    def from_config(cls, config: dict[str, Any], tokenizer: Any) -> "Renderer":
        return cls(tokenizer, config["fmt"], config["template"],
                   train_on_prompt=config.get("train_on_prompt", False),
                   chat_template=config.get("chat_template"), add_bos=config.get("add_bos"),
                   verify_all=config.get("verify_all", False))

    def __getstate__(self) -> dict[str, Any]:
        # caches are not pickled: the copy starts as a fresh Renderer with the same settings
        return {"tokenizer": self.tokenizer, "config": self.config(),
                "reuse_head_tokens": self.reuse_head_tokens}

    def __setstate__(self, state: dict[str, Any]) -> None:
        c = state["config"]
        self.__init__(state["tokenizer"], c["fmt"], c["template"],
                      train_on_prompt=c["train_on_prompt"], chat_template=c["chat_template"],
                      add_bos=c["add_bos"], verify_all=c["verify_all"],
                      reuse_head_tokens=state["reuse_head_tokens"])

    # ------------------------------------------------------------ records

    def segments(self, record: dict) -> list[Segment]:
        """The rendered text as consecutive ``(text, trained)`` segments (neighbours with equal
        flags joined). Raises PacktrainError naming the field, or NothingToTrain."""
        segs = self.kind.segments(records.require_object(record))
        if self.train_on_prompt:
            return [("".join(t for t, _ in segs), True)]
        return records.merge(segs)

    def render(self, msgs: list[Message] | list[dict], add_generation_prompt: bool = False
               ) -> str:
        """The chat template's text for messages (pairs or dicts), as apply_chat_template
        (``template="chat"`` only)."""
        assert self.chat is not None, "render() needs the chat template"
        return self.chat.render(msgs, add_generation_prompt)

    def _segmented(self, recs: list[dict]) -> list[list[Segment] | Exception]:
        out: list[list[Segment] | Exception] = []
        if self.fmt == "preference":  # two entries per record: chosen, rejected
            for rec in recs:
                try:
                    out.extend(self.kind.pair_segments(records.require_object(rec)))
                except PacktrainError as e:
                    out += [e, e]
            return out
        for rec in recs:
            try:
                out.append(self.segments(rec))
            except PacktrainError as e:
                out.append(e)
        return out

    def encode_batch(self, recs: list[dict]) -> list[tuple[np.ndarray, np.ndarray] | Exception]:
        """One entry per record: ``(input_ids, labels)`` (int32; labels -100 where not trained,
        always at position 0) or the PacktrainError / NothingToTrain for that record. All
        segments of the batch are tokenized in one call of the fast tokenizer."""
        return self.encoder.encode_batch(self._segmented(recs))

    def encode_flat(self, recs: list[dict]) -> Flat:
        """:meth:`encode_batch` without cutting the batch into per-record arrays (pack-build
        works on the flat arrays): ``(outcome, ids, labels, starts, ends)`` where outcome[i] is
        record i's exception, or k: its tokens are ``ids[starts[k]:ends[k]]``. Preference
        records give two entries each, 2i the chosen and 2i+1 the rejected side (each side's
        prompt is its own first segment, so both start with the same prompt ids)."""
        return self.encoder.encode_flat(self._segmented(recs))
