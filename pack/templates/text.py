"""The ``none`` template for ``text`` records: BOS (when the tokenizer adds one) + text + EOS, all
trained."""

from __future__ import annotations

from . import records
from .records import NothingToTrain, Segment


class TextTemplate:
    """Text records -> segments, the text and EOS trained."""

    def __init__(self, bos: str, eos: str):
        self.bos, self.eos = bos, eos

    def segments(self, record: dict) -> list[Segment]:
        text = records.require_str(record, "text")
        if not text.strip():
            raise NothingToTrain("empty-text", "field text: empty, nothing to train on")
        return [(self.bos, False), (text + self.eos, True)]

    def head_texts(self) -> list[str]:
        return []
