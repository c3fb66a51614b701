"""The project's error types: what a user can cause and fix, reported in one line."""

from __future__ import annotations


class PacktrainError(Exception):
    """An error the user can cause and fix: the message is one line naming the file, line or
    field and what to do. CLIs print it and exit non-zero; they never show a traceback."""


class FormatError(PacktrainError):
    """A packed dataset that breaks the contract (missing, corrupt, edited or incompatible)."""

    def __init__(self, message: str, shard: str | None = None, row: int | None = None,
                 rule: str | None = None):
        where = ""
        if shard is not None:
            where = shard + (f" row {row}" if row is not None else "") + ": "
        super().__init__(where + message + (f" [rule: {rule}]" if rule else ""))
        self.shard, self.row, self.rule = shard, row, rule
