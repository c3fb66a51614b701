"""The project's error types: what a user can cause and fix, reported in one line."""

from __future__ import annotations

from typing import Any


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


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages about records and fields."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
