"""Build-time sanity checks of pack-build: problems in the data that would otherwise pass
silently, each counted with the first few record numbers (the ``sample_index`` numbering: 0-based,
over the inputs in order, every partition's records included).

Per record, found by the workers on the flat token arrays (:func:`chunk_flags`):

``no_labels``   a record left with no label token (empty response, no assistant turn, empty
                text, a prompt that fills ``--max-length`` under truncation): it is dropped, as
                it always was, and the build is refused when their share of the records exceeds
                ``--max-no-label-share`` (default :data:`MAX_NO_LABEL_SHARE`; 1 never refuses);
``double_bos``  a kept sample that starts with two BOS tokens (the text already starts with the
                BOS string and the template writes another): reported and warned about, kept;
``truncated``   a sample cut to ``--max-length`` (``--overlong truncate``), with the share of
                tokens lost.

Once, at start-up (:func:`check_turns`): a chat template that renders a user turn and an
assistant turn alike (it ignores the role), so what the model is trained to answer cannot be told
from what it is asked; refused unless ``--allow-indistinct-turns``.

The parent adds the workers' per-task flags up in :class:`Findings` (in record order, so the
first record numbers do not depend on the number of workers); the manifest's ``checks`` entry is
:func:`manifest_checks`, pack-merge combines the parts' with :func:`merge_checks`, and
:func:`check_lines` prints them (build summary, pack-info, dataset card).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import Counter
from typing import Any

import numpy as np

from .errors import PacktrainError

FIRST = 5                 # record numbers kept per check
MAX_NO_LABEL_SHARE = 0.05  # default of --max-no-label-share
RECORD_CHECKS = ("no_labels", "double_bos", "truncated")


# ---------------------------------------------------------------- command line

def share(text: str) -> float:
    """``--max-no-label-share``: a fraction from 0 to 1."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} must be a fraction from 0 to 1")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    """pack-build's options of the checks."""
    p.add_argument("--max-no-label-share", type=share, default=MAX_NO_LABEL_SHARE,
                   metavar="FRACTION",
                   help="refuse the build when more than this share of the records is left "
                        "with no label token (they are dropped and counted either way; 1 never "
                        f"refuses; default: {MAX_NO_LABEL_SHARE})")
    p.add_argument("--allow-indistinct-turns", action="store_true",
                   help="build with a chat template that renders user and assistant turns "
                        "alike (refused otherwise)")


def check_share(value: Any) -> None:
    """The same check as :func:`share`, for calls from Python."""
    try:
        share(str(value))
    except argparse.ArgumentTypeError as e:
        raise PacktrainError(f"--max-no-label-share {value!r}: {e}") from None


# ---------------------------------------------------------------- per record (workers)

def chunk_flags(no_labels: np.ndarray, kept: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                cut: np.ndarray, ids: np.ndarray, bos: int | None) -> dict[str, np.ndarray]:
    """The local record indices each check flags in one task: ``no_labels`` as given; of the
    ``kept`` samples (starting at ``starts`` in ``ids``, ``lengths`` tokens after truncation,
    ``cut`` when truncated) those truncated and those starting with two ``bos``."""
    out = {}
    if len(no_labels):
        out["no_labels"] = np.sort(no_labels).astype(np.int64)
    if cut.any():
        out["truncated"] = kept[cut]
    if bos is not None and len(starts):
        two = lengths >= 2
        second = np.minimum(starts + 1, len(ids) - 1)
        dbl = two & (ids[starts] == bos) & (ids[second] == bos)
        if dbl.any():
            out["double_bos"] = kept[dbl]
    return out


# ---------------------------------------------------------------- accumulating (parent)

@dataclasses.dataclass
class Findings:
    """What the checks found so far: counts, the first record numbers and where the first one
    of each check is (``FILE:LINE``)."""

    counts: Counter = dataclasses.field(default_factory=Counter)
    first: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    where: dict[str, str] = dataclasses.field(default_factory=dict)

    def add(self, task: Any, res: Any, base: int) -> None:
        """One task's flags (a :class:`pack.tasks.Task` and its :class:`pack.encode.ChunkResult`);
        ``base`` is the record number of its first record. Tasks must come in record order."""
        for name, local in res.flagged.items():
            self.counts[name] += len(local)
            first = self.first.setdefault(name, [])
            if len(first) < FIRST:
                first.extend(int(j) + base for j in local[:FIRST - len(first)])
            if name not in self.where:
                self.where[name] = _record_where(task, res, int(local[0]))


def _record_where(task: Any, res: Any, j: int) -> str:
    """``FILE:LINE`` (or the record's name) of local record ``j`` of a task: in a raw task the
    lines that were not records come before it too."""
    if task.kind != "rec":
        for line, _, _ in sorted(res.parse_errors):
            if line <= j:
                j += 1
    try:
        return task.where(j)
    except (IndexError, TypeError):  # pragma: no cover - a task without positions
        return task.path or "record"


def refuse_no_labels(found: Findings, records: int, max_share: float) -> None:
    """Refuse the build when more than ``max_share`` of ``records`` had no label token."""
    n = found.counts.get("no_labels", 0)
    if not records or n / records <= max_share:
        return
    nums = ", ".join(map(str, found.first["no_labels"]))
    raise PacktrainError(
        f"{found.where['no_labels']}: {n:,} of {records:,} records ({n / records:.1%}) have no "
        f"label token (records {nums}{', ...' if n > FIRST else ''}), more than "
        f"--max-no-label-share {max_share:g}; fix the data, template or --max-length, or pass "
        f"--max-no-label-share 1 to drop them and pack the rest")


# ---------------------------------------------------------------- the chat template (once)

def check_turns(renderer: Any, source: str | None, allow: bool) -> dict | None:
    """Whether the chat template tells user and assistant turns apart: the same two contents
    rendered with the roles swapped must give another text (or be refused by the template).
    None when the renderer uses no chat template. Raises PacktrainError when they are alike,
    unless ``allow``."""
    if getattr(renderer, "template", None) != "chat":
        return None
    a, b = "PKTCHECKA", "PKTCHECKB"
    try:
        asked = renderer.render([("user", a), ("assistant", b)])
    except PacktrainError:
        return None  # a template that needs more (a system turn, ...): records will tell
    try:
        swapped = renderer.render([("assistant", a), ("user", b)])
    except PacktrainError:  # it refuses an assistant turn first: it reads the roles
        return {"distinct": True}
    if asked != swapped:
        return {"distinct": True}
    if not allow:
        name = source or "the tokenizer's chat template"
        raise PacktrainError(f"{name}: the chat template renders user and assistant turns alike "
                             f"(it ignores the role), so the model could not tell what it is "
                             f"trained to answer from what it is asked; fix the template or "
                             f"pass --allow-indistinct-turns")
    return {"distinct": False, "allowed": True}


# ---------------------------------------------------------------- the manifest

def manifest_checks(found: Findings, stats: dict, max_share: float,
                    turns: dict | None) -> dict:
    """The manifest's ``checks``: every record check (a count of 0 when clean) and, with a chat
    template, ``turns``."""
    out: dict[str, Any] = {name: {"count": int(found.counts.get(name, 0)),
                                  "first_records": list(found.first.get(name, []))}
                           for name in RECORD_CHECKS}
    out["no_labels"]["max_share"] = max_share
    if turns is not None:
        out["turns"] = turns
    return _with_shares(out, stats)


def _with_shares(checks: dict, stats: dict) -> dict:
    """Fill in the shares: of the records, and of the tokens a truncation cut off."""
    records = stats.get("records", 0)
    for name in RECORD_CHECKS:
        if name in checks:
            checks[name]["share"] = round(checks[name]["count"] / records, 6) if records else 0.0
    if "truncated" in checks:
        lost = int(stats.get("truncated_tokens", 0))
        before = lost + int(stats.get("tokens", 0))
        checks["truncated"]["tokens_lost"] = lost
        checks["truncated"]["token_share"] = round(lost / before, 6) if before else 0.0
    return checks


def merge_checks(parts: list[dict | None], stats: dict) -> dict | None:
    """The ``checks`` of a pack-merge: counts summed, the first record numbers of all parts in
    order, shares over the merged ``stats``; ``turns`` and ``max_share`` from the first part.
    None when a part has none (built before the checks existed)."""
    if not parts or any(not isinstance(p, dict) for p in parts):
        return None
    out: dict[str, Any] = {}
    for name in RECORD_CHECKS:
        entries = [p[name] for p in parts if name in p]
        if not entries:
            continue
        out[name] = {"count": sum(int(e["count"]) for e in entries),
                     "first_records": sorted(r for e in entries
                                             for r in e["first_records"])[:FIRST]}
    if "no_labels" in out and "max_share" in parts[0].get("no_labels", {}):
        out["no_labels"]["max_share"] = parts[0]["no_labels"]["max_share"]
    if "turns" in parts[0]:
        out["turns"] = parts[0]["turns"]
    return _with_shares(out, stats)


# ---------------------------------------------------------------- for people

def check_lines(checks: dict | None, where: dict[str, str] | None = None) -> list[str]:
    """The ``checks:`` block of the build summary, pack-info and the card (one line per check);
    nothing for a manifest written before the checks existed."""
    if not checks:
        return []
    where = where or {}

    def found(name: str, what: str, extra: str = "") -> str:
        c = checks[name]
        if not c["count"]:
            return "none"
        nums = ", ".join(map(str, c["first_records"])) + (", ..." if c["count"] > FIRST else "")
        at = f" (first {where[name]})" if name in where else ""
        what = what[:-1] if c["count"] == 1 else what
        return (f"{c['count']:,} {what} ({100 * c.get('share', 0):.2f}%){extra}: "
                f"record{'s' if c['count'] > 1 else ''} {nums}{at}")

    lines = ["checks:"]
    if "no_labels" in checks:
        limit = checks["no_labels"].get("max_share")
        extra = f" dropped, limit {100 * limit:g}%" if limit is not None else " dropped"
        lines.append(f"  no labels     {found('no_labels', 'records', extra)}")
    if "double_bos" in checks:
        warn = "WARNING " if checks["double_bos"]["count"] else ""
        lines.append(f"  doubled BOS   {warn}{found('double_bos', 'samples')}")
    if "truncated" in checks:
        t = checks["truncated"]
        lost = f", {t.get('tokens_lost', 0):,} tokens lost ({100 * t.get('token_share', 0):.2f}%)"
        lines.append(f"  truncated     {found('truncated', 'samples', lost)}")
    if "turns" in checks:
        lines.append("  chat turns    " + ("user and assistant distinct"
                                          if checks["turns"]["distinct"] else
                                          "WARNING user and assistant rendered alike "
                                          "(--allow-indistinct-turns)"))
    return lines


def warnings(checks: dict, where: dict[str, str]) -> list[str]:
    """The one-line warnings a build prints even with ``--quiet``."""
    out = []
    d = checks.get("double_bos", {})
    if d.get("count"):
        nums = ", ".join(map(str, d["first_records"])) + (", ..." if d["count"] > FIRST else "")
        out.append(f"warning: {where.get('double_bos', 'records')}: {d['count']:,} sample(s) "
                   f"start with two BOS tokens (records {nums}): the text already starts with "
                   f"the BOS string and the template writes another; strip it from the data")
    if checks.get("turns", {}).get("distinct") is False:
        out.append("warning: the chat template renders user and assistant turns alike "
                   "(--allow-indistinct-turns)")
    return out
