"""The ``chat`` template: the tokenizer's chat template (or ``chat_template=``, a template
string or a file path) turns messages into segments, each assistant turn's content trained with
the template's end-of-turn text right after it.

The text is exactly ``tokenizer.apply_chat_template(messages, tokenize=False)`` (rendered by
:mod:`.chat_render`), but most records are assembled from their role sequence's cached layout
(:mod:`.chat_layout`) instead of rendered. An assembled text is checked against a real render
for the first ``VERIFY_FIRST`` records of each role sequence, for every record of a sequence
whose probe came out changed, and for every record whose contents are empty, have
leading/trailing whitespace (``| trim``), or contain a string constant of the template
(``</think>``, ``<tool_response>``: things a template can test). When the check fails, the real
render is split along the layout's fixed text (contents trimmed or cut); what cannot be split so
is placed by exact prefix rendering (quadratic, rare: e.g. Qwen3 reasoning in the last turn,
which is then trained). A record that a template renders differently when cut after a turn
*and* that cannot be split raises PacktrainError. ``verify_all=True`` checks every record.
"""

from __future__ import annotations

from typing import Any, Callable

from . import records
from .chat_layout import PH, Layout, Layouts, assemble, split_rendered
from .chat_render import ChatRender, special_tokens_re, string_constants
from .records import Message, NothingToTrain, Segment, field_error

VERIFY_FIRST = 1


class ChatTemplate:
    """Messages (or Alpaca) records -> segments through a chat template."""

    def __init__(self, tokenizer: Any, fmt: str, source: str, *, verify_all: bool = False,
                 on_layout: Callable[[list[str]], None] | None = None):
        self.fmt, self.verify_all = fmt, verify_all
        specials = special_tokens_re(tokenizer)
        self.render = ChatRender(tokenizer, source)
        # contents holding one of these are always checked (role names are no sign)
        self.markers = string_constants(self.render.environment, source, records.ROLE_SET)
        self.layouts = Layouts(self.render, specials, on_layout)

    def head_texts(self) -> list[str]:
        return []

    def segments(self, record: dict) -> list[Segment]:
        msgs = records.alpaca_as_messages(record) if self.fmt == "alpaca" \
            else records.messages(record)
        roles = tuple(r for r, _ in msgs)
        contents = [c for _, c in msgs]
        asst = [c for r, c in msgs if r == "assistant"]
        if not asst:
            raise NothingToTrain("no-assistant-turn", "field messages: no assistant turn, "
                                                      "nothing to train on")
        if not any(c.strip() for c in asst):
            raise NothingToTrain("empty-response", "field messages: every assistant turn is "
                                                   "empty, nothing to train on")
        lay = self.layouts.get(roles)
        if lay is None:
            return self._slow_segments(msgs, self.render(msgs), None)
        segs = assemble(lay, roles, contents)
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

    def _needs_check(self, lay: Layout, contents: list[str]) -> bool:
        if self.verify_all or lay.always_verify or lay.checked < VERIFY_FIRST:
            return True
        return self._visible_cause(contents)

    def _visible_cause(self, contents: list[str]) -> bool:
        """Whether a template could render these contents differently from placeholders:
        empty, leading/trailing whitespace, or holding one of the template's string constants."""
        for c in contents:
            if not c or c[0].isspace() or c[-1].isspace():
                return True
        if self.markers:
            joined = "\x00".join(contents)
            return any(m in joined for m in self.markers)
        return False

    def _slow_segments(self, msgs: list[Message], real: str, lay: Layout | None
                       ) -> list[Segment]:
        """Segments of a record whose assembled text differed from the real render (or whose
        role sequence has no layout): split the real render along the layout's fixed pieces as
        far as that goes, and place the remaining assistant turns by prefix rendering."""
        found = split_rendered(lay, [c for _, c in msgs], real) if lay is not None else []
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
                raise field_error("messages", "the chat template places assistant turns out of "
                                              "order, so the trained text cannot be placed; "
                                              "drop or fix the record")
            segs.append((real[pos:s], False))
            segs.append((real[s:e], True))
            pos = e
        segs.append((real[pos:], False))
        return records.merge(segs)

    def _prefix_span(self, msgs: list[Message], i: int, real: str) -> tuple[int, int]:
        """Place assistant turn i by rendering the conversation cut before and after it; the
        cut renders must be prefixes of the whole render. Raises PacktrainError otherwise."""
        ph = PH.format(0)
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
            raise field_error(
                f"messages[{i}]", "the chat template renders this conversation differently when "
                                  "it is cut after this turn (it rewrites earlier turns), so the "
                                  "trained text cannot be placed; drop or fix the record, or use a "
                                  "training variant of the template")
        end = len(upto)
        closing = self.layouts.closing_text()
        if closing and real[start:end].endswith(closing):
            end -= len(closing) - self.layouts.trained_close(closing)
        return start, end
