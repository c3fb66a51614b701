"""The ``alpaca`` template: the Stanford Alpaca prompt, word for word, then the response and EOS,
as Stanford's train.py builds ``source + target``.

Optional ``system`` is prepended (``system + "\\n\\n"``); optional ``history``
(``[[instruction, output], ...]``) is rendered before, each earlier turn a full no-input prompt +
output + EOS, its output trained too. ``messages`` records of one user and one assistant turn
(and an optional system message) are rendered so as well.
"""

from __future__ import annotations

from . import records
from .records import Segment

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


class AlpacaTemplate:
    """Alpaca and messages records -> segments: prompts untrained, responses + EOS trained."""

    def __init__(self, fmt: str, bos: str, eos: str):
        self.fmt, self.bos, self.eos = fmt, bos, eos

    def segments(self, record: dict) -> list[Segment]:
        if self.fmt == "messages":
            record = records.messages_as_alpaca(record)
        system, turns = records.alpaca_parts(record)
        segs = [(self.bos + (system + "\n\n" if system else ""), False)]
        for instruction, inp, output in turns:
            prompt = (PROMPT_INPUT.format(instruction=instruction, input=inp) if inp
                      else PROMPT_NO_INPUT.format(instruction=instruction))
            segs.append((prompt, False))
            segs.append((output + self.eos, True))
        return segs

    def head_texts(self) -> list[str]:
        """The fixed text every prompt starts with, with and without BOS (a history turn's
        prompt starts a segment of its own): its ids can be reused
        (:mod:`pack.tokenize.head_tokens`)."""
        fixed = [p[:p.index("{instruction}")] for p in (PROMPT_INPUT, PROMPT_NO_INPUT)]
        return [self.bos + f for f in fixed] + fixed
