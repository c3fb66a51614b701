"""Checks and normalises the records a template renders: OpenAI ``messages`` and ShareGPT
``conversations`` become ``(role, content)`` pairs, Alpaca fields become a system text and
``(instruction, input, output)`` turns, and either can be converted into the other's shape.

Errors name the field (``field output: expected a string, got number``); the caller prefixes
``FILE:LINE: ``. A record with nothing to learn from raises :class:`NothingToTrain`.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..errors import PacktrainError, json_type

ROLES = ("system", "user", "assistant")
ROLE_SET = frozenset(ROLES)
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}

Segment = tuple[str, bool]  # (text, trained)
Message = tuple[str, str]  # (role, content)
AlpacaTurn = tuple[str, str, str]  # (instruction, input, output)


class NothingToTrain(PacktrainError):
    """The record has no response to learn from; the builder drops and counts it by ``reason``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def field_error(field: str, what: str) -> PacktrainError:
    return PacktrainError(f"field {field}: {what}")


def require_str(record: dict, key: str, field: str | None = None) -> str:
    field = field or key
    if key not in record:
        raise field_error(field, "missing")
    v = record[key]
    if not isinstance(v, str):
        raise field_error(field, f"expected a string, got {json_type(v)}")
    return v


def optional_str(record: dict, key: str) -> str:
    v = record.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise field_error(key, f"expected a string, got {json_type(v)}")
    return v


def require_object(record: Any) -> dict:
    if not isinstance(record, dict):
        raise PacktrainError(f"record: expected an object, got {json_type(record)}")
    return record


def merge(segs: Iterable[Segment]) -> list[Segment]:
    """Join neighbours with the same flag; drop empty texts."""
    out: list[Segment] = []
    for text, flag in segs:
        if not text:
            continue
        if out and out[-1][1] == flag:
            out[-1] = (out[-1][0] + text, flag)
        else:
            out.append((text, flag))
    return out


def messages(record: dict) -> list[Message]:
    """Validated (role, content) pairs of a messages record (OpenAI or ShareGPT)."""
    if "messages" in record:
        key, rk, ck, names = "messages", "role", "content", None
    elif "conversations" in record:
        key, rk, ck, names = "conversations", "from", "value", SHAREGPT_ROLES
    else:
        raise field_error("messages", "missing (expected 'messages' or 'conversations')")
    msgs = record[key]
    if not isinstance(msgs, list):
        raise field_error(key, f"expected an array of messages, got {json_type(msgs)}")
    if not msgs:
        raise field_error(key, "empty conversation")
    if names is None:  # fast path for well-formed OpenAI messages; errors take the slow one
        try:
            out = [(m["role"], m["content"]) for m in msgs]
        except (KeyError, TypeError):
            out = None
        if out is not None and all(r in ROLE_SET and type(c) is str for r, c in out):
            return out
    return _checked_messages(msgs, key, rk, ck, names)


def _checked_messages(msgs: list, key: str, rk: str, ck: str,
                      names: dict[str, str] | None) -> list[Message]:
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise field_error(f"{key}[{i}]", f"expected an object, got {json_type(m)}")
        if rk not in m and names is not None and "role" in m:
            # ShareGPT key with OpenAI messages: the rest of the conversation is read so too
            rk, ck, names = "role", "content", None
        role = require_str(m, rk, f"{key}[{i}].{rk}")
        if names is None:
            if role not in ROLES:
                raise field_error(f"{key}[{i}].{rk}", f"unknown role {role!r}; use system, "
                                                      f"user or assistant")
        else:
            if role not in names:
                raise field_error(f"{key}[{i}].{rk}", f"unknown role {role!r}; use system, "
                                                      f"human or gpt")
            role = names[role]
        out.append((role, require_str(m, ck, f"{key}[{i}].{ck}")))
    return out


def alpaca_parts(record: dict) -> tuple[str, list[AlpacaTurn]]:
    """(system, [(instruction, input, output), ...]) with history first."""
    instruction = require_str(record, "instruction")
    output = require_str(record, "output")
    inp = optional_str(record, "input")
    system = optional_str(record, "system")
    turns = []
    hist = record.get("history")
    if hist is not None:
        if not isinstance(hist, list):
            raise field_error("history", f"expected an array of [instruction, output] pairs, "
                                         f"got {json_type(hist)}")
        for i, pair in enumerate(hist):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise field_error(f"history[{i}]", "expected [instruction, output]")
            for k, v in enumerate(pair):
                if not isinstance(v, str):
                    raise field_error(f"history[{i}][{k}]",
                                      f"expected a string, got {json_type(v)}")
            turns.append((pair[0], "", pair[1]))
    turns.append((instruction, inp, output))
    if not output.strip():
        raise NothingToTrain("empty-response", "field output: empty response, nothing to "
                                               "train on")
    return system, turns


def messages_as_alpaca(record: dict) -> dict:
    """A messages record of one user and one assistant turn (and an optional system message) as
    Alpaca fields."""
    msgs = messages(record)
    system = ""
    if msgs and msgs[0][0] == "system":
        system, msgs = msgs[0][1], msgs[1:]
    if [r for r, _ in msgs] != ["user", "assistant"]:
        raise field_error("messages", "the alpaca template takes one user and one assistant "
                                      "turn (plus an optional system message); use "
                                      "--template chat for multi-turn conversations")
    return {"system": system, "instruction": msgs[0][1], "output": msgs[1][1]}


def alpaca_as_messages(record: dict) -> list[Message]:
    """An Alpaca record as messages ``[system?], (user, assistant)*``, the user turn
    ``instruction`` or ``instruction + "\\n\\n" + input``."""
    system, turns = alpaca_parts(record)
    msgs = [("system", system)] if system else []
    for instruction, inp, output in turns:
        msgs.append(("user", instruction + ("\n\n" + inp if inp else "")))
        msgs.append(("assistant", output))
    return msgs
