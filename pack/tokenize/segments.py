"""Tokenizes rendered records: each record's ``(text, trained)`` segments become its token ids and
labels (-100 where not trained, and always at position 0), a batch at a time.

All segments of a batch go to the Rust tokenizer in one ``encode_batch_fast`` call (no special
tokens added; special-token strings in the text, such as ``<|eot_id|>`` in template text, become
their single ids), and the ids of a record are its segments' ids back to back, so the label
boundaries are exact. Fixed template text at a segment's ends (Alpaca's header, a chat template's
text up to and from its special tokens) is tokenized once and its ids reused where that is exact
(:mod:`.head_tokens`, :mod:`.fixed_pieces`). The Rust call runs on the encode thread
(:mod:`.encode_thread`) and uses all cores unless ``TOKENIZERS_PARALLELISM=false``: set that in
worker processes when running several.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Callable, Iterable

import numpy as np

from ..errors import PacktrainError
from ..format import IGNORE_INDEX
from . import encode_thread, fixed_pieces, head_tokens

Segment = tuple[str, bool]  # (text, trained)
Flat = tuple[list[Any], np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def not_text_error() -> PacktrainError:
    e = PacktrainError("field record: a string holds a lone UTF-16 surrogate (an unpaired "
                       "\\ud800-\\udfff escape), which is not Unicode text; fix the record")
    e.reason = "invalid-unicode"  # type: ignore[attr-defined]
    return e


def records_not_text(owners: list[int], texts: list[str], nsegs: list) -> set[int]:
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


class SegmentEncoder:
    """Segments -> ``(input_ids, labels)``. ``head_texts``: fixed texts records start with
    (:mod:`.head_tokens`); ``fixed_texts`` (BOS, EOS) and later :meth:`offer_fixed_texts`:
    fixed template texts (:mod:`.fixed_pieces`). ``reuse=False`` tokenizes every text whole (the
    same ids). ``nothing_trained()`` is the error for a record left with no trained token."""

    def __init__(self, tokenizer: Any, *, reuse: bool = True, head_texts: Iterable[str] = (),
                 fixed_texts: Iterable[str] = (),
                 nothing_trained: Callable[[], Exception] | None = None):
        self.tokenizer = tokenizer
        self.reuse = bool(reuse)
        self.head_texts = list(head_texts)
        self.nothing_trained = nothing_trained or (lambda: PacktrainError(
            "no trained tokens after tokenization, nothing to train on"))
        self.backend = getattr(tokenizer, "_tokenizer", None)
        if self.backend is not None and getattr(self.backend, "encode_special_tokens", False):
            self.backend = None  # it would split special tokens: use the Python path
        self._heads: list[head_tokens.Head] | None = None  # made on first use
        # the tables are remade when fixed texts are added
        self._fixed_texts: dict[str, None] = dict.fromkeys(t for t in fixed_texts if t)
        self._tables: tuple[list[head_tokens.Head], list[fixed_pieces.Tail]] | None = None
        self._pieces_usable: bool | None = None

    def offer_fixed_texts(self, texts: list[str]) -> None:
        """More fixed template text (a new chat layout's) whose ids may be reused; capped, since
        every segment is tested against each candidate."""
        new = [t for t in texts if t and t not in self._fixed_texts]
        if new and len(self._fixed_texts) < 4 * fixed_pieces.MAX_TEXTS:
            self._fixed_texts.update(dict.fromkeys(new))
            self._tables = None

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.backend is not None:
            encode = getattr(self.backend, "encode_batch_fast", None) or \
                self.backend.encode_batch
            # off the main thread: measured cheaper, see encode_thread.py
            return encode_thread.call(
                lambda: [e.ids for e in encode(texts, add_special_tokens=False)])
        return encode_thread.call(
            lambda: self.tokenizer(texts, add_special_tokens=False)["input_ids"])

    def head_tokens(self) -> list[head_tokens.Head]:
        """The head texts whose tokens are reused (:mod:`.head_tokens`)."""
        if self._heads is None:
            self._heads = []
            if self.head_texts and self.reuse and self.backend is not None:
                self._heads = head_tokens.prepare(self.backend, self.head_texts,
                                                  self.encode_texts)
        return self._heads

    def reuse_tables(self) -> tuple[list[head_tokens.Head], list[fixed_pieces.Tail]]:
        """The fixed leading and trailing texts whose ids are reused, longest first: the head
        texts (:mod:`.head_tokens`) and fixed text up to or from a special token
        (:mod:`.fixed_pieces`)."""
        if self._tables is None:
            heads = list(self.head_tokens())
            tails: list[fixed_pieces.Tail] = []
            if self._pieces_usable is None:
                self._pieces_usable = (self.reuse and self.backend is not None
                                       and fixed_pieces.usable(self.backend))
            if self._pieces_usable:
                fronts, tails = fixed_pieces.prepare(self.backend, list(self._fixed_texts),
                                                     self.encode_texts)
                heads = sorted(heads + fronts, key=lambda h: len(h[0]), reverse=True)
            self._tables = (heads, tails)
        return self._tables

    def encode_flat(self, segmented: list[list[Segment] | Exception]) -> Flat:
        """Per record its segments, or the exception that stands for it -> ``(outcome, ids,
        labels, starts, ends)``: outcome[i] is record i's exception, or k: its tokens are
        ``ids[starts[k]:ends[k]]``. All segments go to the tokenizer in one call."""
        out: list[Any] = list(segmented)
        texts: list[str] = []
        flags: list[bool] = []
        owners: list[int] = []  # record index of each segment
        for i, segs in enumerate(segmented):
            if isinstance(segs, Exception):
                continue
            owners.append(i)
            texts.extend(t for t, _ in segs)
            flags.extend(f for _, f in segs)
            out[i] = len(segs)
        if not texts:
            return (out, np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64),
                    np.zeros(0, np.int64))
        heads, tails = self.reuse_tables()
        try:
            ids_lists, seg_lens = self._encode_segments(texts, heads, tails)
        except (TypeError, ValueError, UnicodeError):
            # The fast tokenizer refuses the whole batch for one string that is not Unicode
            # text (a lone surrogate, from a JSON escape such as \ud800): refuse those records
            # and tokenize the others.
            bad = records_not_text(owners, texts, out)
            if not bad:
                raise
            return self.encode_flat([not_text_error() if i in bad else s
                                     for i, s in enumerate(segmented)])
        return self._labelled(out, owners, flags, ids_lists, seg_lens)

    def encode_batch(self, segmented: list[list[Segment] | Exception]
                     ) -> list[tuple[np.ndarray, np.ndarray] | Exception]:
        """:meth:`encode_flat` cut into per-record ``(input_ids, labels)`` (or exceptions)."""
        out, ids, labels, starts, ends = self.encode_flat(segmented)
        return [(ids[starts[r]:ends[r]], labels[starts[r]:ends[r]]) if isinstance(r, int) else r
                for r in out]

    def _encode_segments(self, texts: list[str], heads: list[head_tokens.Head],
                         tails: list[fixed_pieces.Tail]
                         ) -> tuple[Iterable[list[int]], np.ndarray]:
        """The ids of each text (reused fixed ids included) and their numbers."""
        if heads or tails:
            cut, front, back = fixed_pieces.cut(texts, heads, tails)
            ids_lists = self.encode_texts(cut)
        else:
            front = back = None
            ids_lists = self.encode_texts(texts)
        n = len(ids_lists)
        seg_lens = np.fromiter(map(len, ids_lists), dtype=np.int64, count=n)
        if front is None:
            return ids_lists, seg_lens
        # reused ids before and after each segment's tokenized middle
        seg_lens += np.fromiter(map(len, front), dtype=np.int64, count=n)
        seg_lens += np.fromiter(map(len, back), dtype=np.int64, count=n)
        return chain.from_iterable(zip(front, ids_lists, back)), seg_lens

    def _labelled(self, out: list[Any], owners: list[int], flags: list[bool],
                  ids_lists: Iterable[list[int]], seg_lens: np.ndarray) -> Flat:
        """The flat ids and labels of the owners' segments, each record's first label masked;
        a record left without a trained token becomes ``nothing_trained()``."""
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
            out[i] = k if trained[k] else self.nothing_trained()
        return out, ids, labels, rec_start, rec_end
