"""The ``preference`` record format: a prompt and two completions, chosen and rejected, become
two segment lists that start with the same prompt text (untrained) followed by the completion
(trained), rendered with the same template machinery as SFT records.

Record shapes (auto-detected by ``chosen`` + ``rejected``):

* TRL conversational: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``;
* TRL standard: ``{"prompt": str, "chosen": str, "rejected": str}``;
* ``{"messages": [prompt turns], "chosen": ..., "rejected": ...}``;
* implicit prompt (TRL's, Anthropic HH): ``{"chosen": full conversation, "rejected": ...}``, both
  message lists or both strings (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``). The prompt is their
  shared prefix up to and including the last assistant cue (the messages before the first
  assistant turn where they differ; the text through the last ``"\\n\\nAssistant:"``).

A completion is a string or a list of messages starting with an assistant turn.

Rendering: with ``template="chat"`` the prompt (a string becomes one user turn; HH text is split
into its Human/Assistant turns) is rendered with the generation prompt, and each side is the
conversation prompt + completion (a string becomes one assistant turn) through the chat template:
the completion's assistant turns and their end-of-turn text trained, everything of the prompt
untrained (earlier assistant turns too). With ``template="none"`` (tokenizers without a chat
template) records must be strings: BOS + prompt untrained, completion + EOS trained.

A pair whose two completions are identical raises NothingToTrain ``identical-pair``; one with an
empty completion ``empty-response``; these are dropped and counted. The prompt text is its own
first segment on both sides, so both sides start with the same prompt tokens.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import PacktrainError, json_type
from . import records
from .records import Message, NothingToTrain, Segment, field_error

HH_CUE = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _side(record: dict, key: str) -> list[Message] | str:
    if key not in record:
        raise field_error(key, "missing")
    v = record[key]
    return v if isinstance(v, str) else _field_messages(v, key)


def _field_messages(value: Any, field: str) -> list[Message]:
    """``records.messages`` for any field, errors naming that field."""
    if not isinstance(value, list) or not value:
        raise field_error(field, f"expected a string or a non-empty array of messages, got "
                                 f"{'an empty array' if value == [] else json_type(value)}")
    try:
        return records.messages({"messages": value})
    except PacktrainError as e:
        raise PacktrainError(str(e).replace("field messages", f"field {field}", 1)) from None


def pair_parts(record: dict) -> tuple[list[Message] | str, list[Message] | str,
                                      list[Message] | str]:
    """``(prompt, chosen, rejected)`` of a preference record, each a string or messages."""
    chosen, rejected = _side(record, "chosen"), _side(record, "rejected")
    if "prompt" in record:
        p = record["prompt"]
        prompt = p if isinstance(p, str) else _field_messages(p, "prompt")
    elif "messages" in record:
        prompt = _field_messages(record["messages"], "messages")
    else:
        prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(side, str) and side[0][0] != "assistant":
            raise field_error(key, "a completion's first message must be an assistant turn")
        if not _text(side).strip():
            raise NothingToTrain("empty-response", f"field {key}: empty completion, nothing to "
                                                   f"train on")
    if chosen == rejected:
        raise NothingToTrain("identical-pair", "fields chosen and rejected: identical "
                                               "completions, nothing to learn")
    return prompt, chosen, rejected


def _text(side: list[Message] | str) -> str:
    return side if isinstance(side, str) else "".join(c for r, c in side if r == "assistant")


def _implicit_prompt(chosen: list[Message] | str, rejected: list[Message] | str
                     ) -> tuple[Any, Any, Any]:
    """Split two full conversations into their shared prompt and the two completions."""
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise field_error("rejected", "chosen and rejected must both be strings or both be "
                                      "message arrays")
    if chosen == rejected:
        raise NothingToTrain("identical-pair", "fields chosen and rejected: identical "
                                               "conversations, nothing to learn")
    no_prompt = field_error("chosen", "chosen and rejected share no prompt (no common start "
                                      "ending with an assistant cue); add a 'prompt' field")
    if isinstance(chosen, str):
        k = _common_prefix(chosen, rejected)
        cut = chosen.rfind(HH_CUE, 0, k)
        if cut < 0:
            raise no_prompt
        cut += len(HH_CUE)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    k = _common_prefix(chosen, rejected)
    while k > 0 and not (k < len(chosen) and k < len(rejected)
                         and chosen[k][0] == rejected[k][0] == "assistant"):
        k -= 1
    if k == 0:
        raise no_prompt
    return chosen[:k], chosen[k:], rejected[k:]


def _common_prefix(a: Any, b: Any) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def hh_messages(text: str) -> list[Message]:
    """Anthropic HH prompt text (``\\n\\nHuman: ...\\n\\nAssistant:``) as messages, the final
    assistant cue left to the generation prompt; other text is one user turn."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return [("user", text)]
    msgs = [("user" if who == "Human" else "assistant", body.strip())
            for who, body in zip(parts[1::2], parts[2::2])]
    if msgs[-1] == ("assistant", ""):
        msgs.pop()
    return msgs if msgs and msgs[-1][0] == "user" else [("user", text)]


class PreferenceTemplate:
    """Preference records -> (chosen segments, rejected segments); ``chat`` is the
    :class:`.chat.ChatTemplate` for ``template="chat"``, None for plain text."""

    def __init__(self, chat: Any, bos: str, eos: str):
        self.chat, self.bos, self.eos = chat, bos, eos

    def head_texts(self) -> list[str]:
        return []

    def segments(self, record: dict) -> list[Segment]:
        """The chosen side's segments (what a single-record check renders)."""
        return self.pair_segments(record)[0]

    def pair_segments(self, record: dict) -> tuple[list[Segment], list[Segment]]:
        prompt, chosen, rejected = pair_parts(record)
        if self.chat is None:
            return self._plain(prompt, chosen), self._plain(prompt, rejected)
        pmsgs = hh_messages(prompt) if isinstance(prompt, str) and prompt.endswith(HH_CUE) \
            else _as_messages(prompt, "user")
        head = self.chat.render(pmsgs, add_generation_prompt=True)
        return (self._chat(pmsgs, head, chosen, "chosen"),
                self._chat(pmsgs, head, rejected, "rejected"))

    def _plain(self, prompt: Any, side: Any) -> list[Segment]:
        if not isinstance(prompt, str) or not isinstance(side, str):
            raise field_error("prompt", "message arrays need a chat template; pass "
                                        "--chat-template FILE or a tokenizer that has one")
        return [(self.bos + prompt, False), (side + self.eos, True)]

    def _chat(self, pmsgs: list[Message], head: str, side: Any, key: str) -> list[Segment]:
        conv = pmsgs + _as_messages(side.lstrip() if isinstance(side, str) else side,
                                    "assistant")
        segs = self.chat.segments({"messages": [{"role": r, "content": c} for r, c in conv]})
        full = "".join(t for t, _ in segs)
        if not full.startswith(head):
            raise field_error(key, "the chat template renders the prompt differently once a "
                                   "completion follows it, so the two sides would not share "
                                   "their prompt tokens; drop or fix the record")
        rest, pos = [], 0
        for text, trained in segs:  # everything of the prompt is untrained
            end = pos + len(text)
            if end > len(head):
                rest.append((text[max(0, len(head) - pos):], trained))
            pos = end
        return [(head, False)] + records.merge(rest)


def _as_messages(value: list[Message] | str, role: str) -> list[Message]:
    return [(role, value)] if isinstance(value, str) else list(value)
