"""The fixed text a chat template writes around the contents of each role sequence, found once
and cached, so that records are assembled by concatenation instead of rendered.

For a role sequence the template is rendered once with placeholder contents wrapped in
punctuation, inner whitespace and non-ASCII text (:data:`PROBE`); when every wrapped placeholder
comes back untouched, the text between them is the layout. A template that changes them
(``| upper``, ``replace``, escaping) is rendered again with bare placeholders and its layout is
marked ``always_verify``; one that drops, repeats or reorders contents has no layout. Each
assistant turn is trained with the template's end-of-turn text right after it
(:meth:`Layouts.close_len`).
"""

from __future__ import annotations

import os
import re
from typing import Callable

from ..errors import PacktrainError
from .chat_render import ChatRender
from .records import Segment

LAYOUT_CACHE_MAX = 8192
PH = "PKTPH{:06d}Z"  # placeholder content: alphanumeric, no whitespace
PH_RE = re.compile(r"PKTPH\d{6}Z")
# A second placeholder render wraps each placeholder in these characters (no whitespace at the
# ends, which records are checked for anyway): a template that changes any of them (replace,
# escape, upper/capitalize, ...) gets every record of that role sequence checked.
PROBE = "a \n\t\r\u3000\xa0Z9\u00e9\U0001F600\u4e2d<'\"&>{}[]()%#\\/|~`*_.,;:!?-+=$@^b"


class Layout:
    """The fixed text of one role sequence: ``pieces[0] c0 pieces[1] c1 ... pieces[n]`` and, per
    message j, how many leading characters of ``pieces[j + 1]`` are trained with it."""

    __slots__ = ("pieces", "close", "checked", "always_verify")

    def __init__(self, pieces: list[str], close: list[int]):
        self.pieces, self.close = pieces, close
        self.checked = 0
        self.always_verify = False

    def fixed_texts(self) -> list[str]:
        """The fixed text as it falls into segments (trained closings apart)."""
        parts = [self.pieces[0]]
        for j, k in enumerate(self.close):
            nxt = self.pieces[j + 1]
            parts += [nxt[:k], nxt[k:]] if k else [nxt]
        return [t for t in parts if t]


_NO_LAYOUT = object()


def split_pieces(text: str, marks: list[str]) -> list[str] | None:
    """The text around each mark, when every mark occurs exactly once, in order. Each mark
    holds exactly one placeholder, so one scan for placeholders decides it (counting every
    mark in the text was quadratic in the length of long conversations)."""
    found = list(PH_RE.finditer(text))
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


def assemble(lay: Layout, roles: tuple[str, ...], contents: list[str]) -> list[Segment]:
    """Segments of one record from its layout, neighbours with equal flags already joined."""
    pieces, close = lay.pieces, lay.close
    segs: list[Segment] = []
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


def split_rendered(lay: Layout, contents: list[str], real: str) -> list[tuple[int, int]]:
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
            cands = _content_ends(real, pos, c, nxt)
        for p in cands:
            if real[pos:p] in c:
                out.append((pos, p))
                pos = p + len(nxt)
                break
        else:
            return out
    return out


def _content_ends(real: str, pos: int, c: str, nxt: str) -> list[int]:
    """Where content ``c``, as written from ``pos`` on, may end: right before ``nxt`` after the
    content whole or stripped, else before any later ``nxt``."""
    for t in (c, c.strip(), c.lstrip(), c.rstrip()):
        if real.startswith(t + nxt, pos):
            return [pos + len(t)]
    cands = []
    i = real.find(nxt, pos)
    while i >= 0:
        cands.append(i)
        i = real.find(nxt, i + 1)
    return cands


class Layouts:
    """Role sequence -> :class:`Layout` (None where the template has none), made on first use.
    ``on_layout`` is told each new layout's fixed texts (for id reuse)."""

    def __init__(self, render: ChatRender, specials: re.Pattern | None,
                 on_layout: Callable[[list[str]], None] | None = None):
        self.render, self.specials, self.on_layout = render, specials, on_layout
        self._cache: dict[tuple[str, ...], object] = {}
        self._closing: str | None = None

    def get(self, roles: tuple[str, ...]) -> Layout | None:
        lay = self._cache.get(roles)
        if lay is None:
            if len(self._cache) >= LAYOUT_CACHE_MAX:
                self._cache.clear()
            lay = self._cache[roles] = self._build(roles)
        return None if lay is _NO_LAYOUT else lay

    def _build(self, roles: tuple[str, ...]) -> object:
        phs = [PH.format(i) for i in range(len(roles))]
        lay = self._probed(roles, phs)
        if lay is None:
            lay = self._plain(roles, phs)
        if lay is None:
            return _NO_LAYOUT
        closing = self.closing_text()
        for j, role in enumerate(roles):
            lay.close.append(self.close_len(lay.pieces[j + 1], closing)
                             if role == "assistant" else 0)
        if self.on_layout is not None:
            self.on_layout(lay.fixed_texts())
        return lay

    def _probed(self, roles: tuple[str, ...], phs: list[str]) -> Layout | None:
        """One render with each placeholder wrapped in PROBE: when every wrapped placeholder
        comes back intact the template passes contents through unchanged, and the text between
        them is the layout (a template that rewrites contents fails this and takes the
        two-render path below, with every record checked)."""
        try:
            text = self.render([(r, PROBE + ph + PROBE) for r, ph in zip(roles, phs)])
        except PacktrainError:
            return None
        pieces = split_pieces(text, [PROBE + ph + PROBE for ph in phs])
        return Layout(pieces, []) if pieces is not None else None

    def _plain(self, roles: tuple[str, ...], phs: list[str]) -> Layout | None:
        try:
            text = self.render(list(zip(roles, phs)))
        except PacktrainError:
            return None
        pieces = split_pieces(text, phs)
        if pieces is None:
            return None  # the template drops, repeats or rewrites contents
        lay = Layout(pieces, [])
        lay.always_verify = True  # it changed the probed contents, or failed on them
        return lay

    def closing_text(self) -> str:
        """What the template writes right after the content of a final assistant turn."""
        if self._closing is None:
            ph1 = PH.format(1)
            try:
                text = self.render([("user", PH.format(0)), ("assistant", ph1)])
                self._closing = text[text.index(ph1) + len(ph1):] if text.count(ph1) == 1 else ""
            except PacktrainError:
                self._closing = ""
        return self._closing

    def trained_close(self, closing: str) -> int:
        """How many leading characters of a turn's closing text are trained."""
        if self.specials is not None:
            m = self.specials.search(closing)
            if m:
                return m.end()
        return len(closing.rstrip())

    def close_len(self, after: str, closing: str) -> int:
        """How much of the text after an assistant content is trained with it: through a special
        token that follows the content at once (``<|eot_id|>``, ``<|im_end|>``); otherwise
        through the first special token of the part shared with the template's closing of a
        final turn, or all of that closing but trailing whitespace when it is shared whole."""
        if self.specials is not None:
            m = self.specials.match(after)
            if m:
                return m.end()
        common = os.path.commonprefix([after, closing])
        if self.specials is not None:
            m = self.specials.search(common)
            if m:
                return m.end()
        return len(common.rstrip()) if common == closing else 0
