"""The held-out eval split of pack-build (``--eval-fraction F`` / ``--eval-records N``): which
records are held out, and the records of the split written into both manifests.

A record's side is decided by its content alone: ``h = blake2b-64(canonical JSON of the record,
key = --eval-seed)``, read as an unsigned 64-bit integer. ``--eval-fraction F`` holds out every
record with ``h < floor(F * 2**64)``, so a record's side never changes when records are added,
removed or reordered, and identical records always land on the same side. ``--eval-records N``
holds out the N records with the smallest ``h`` (stable under reordering; adding records can move
the boundary). Only records that give a sample take part: dropped and invalid ones are in
neither dataset. The held-out samples are packed, with the build's tokenizer, template,
max_length and packing, into the ordinary dataset ``OUT/eval/`` (:data:`EVAL_DIR`), whose
``sample_index`` is still the record's number in the whole build.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PacktrainError
from .outdir import EVAL_DIR

HASH_RULE = "blake2b-64(key=seed as 8 bytes little-endian) of the record's canonical JSON"
_SCALE = 2.0 ** 64


@dataclasses.dataclass(frozen=True)
class EvalRule:
    """A checked eval split: ``fraction`` or ``records`` (the other None) and the hash seed."""

    fraction: float | None
    records: int | None
    seed: int

    def record(self, threshold: int) -> dict[str, Any]:
        """The split as the manifests record it (``threshold``: the hash bound, exclusive)."""
        rule = {"rule": "fraction", "fraction": self.fraction} if self.records is None \
            else {"rule": "records", "records": self.records}
        return {**rule, "seed": self.seed, "hash": HASH_RULE,
                "threshold": f"{threshold:016x}"}


def eval_rule(cfg: Any) -> EvalRule | None:
    """The eval split ``cfg`` asks for (None without --eval-fraction/--eval-records); one-line
    errors for bad values and combinations, before any slow work."""
    frac = getattr(cfg, "eval_fraction", None)
    n = getattr(cfg, "eval_records", None)
    seed = getattr(cfg, "eval_seed", 0)
    if seed is None or not 0 <= int(seed) < 2 ** 63:
        raise PacktrainError(f"--eval-seed {seed}: must be a whole number from 0 to 2**63 - 1")
    if frac is None and n is None:
        return None
    if frac is not None and n is not None:
        raise PacktrainError(f"--eval-fraction {frac} and --eval-records {n}: pass one of them, "
                             f"not both")
    if frac is not None and not 0 < float(frac) < 1:  # also refuses nan
        raise PacktrainError(f"--eval-fraction {frac}: must be a number between 0 and 1 "
                             f"(exclusive), e.g. 0.01")
    if n is not None and not 1 <= int(n) < 2 ** 63:
        raise PacktrainError(f"--eval-records {n}: must be a whole number of records, at least 1")
    if n is not None and int(getattr(cfg, "num_partitions", 1) or 1) > 1:
        raise PacktrainError(f"--eval-records {n}: an exact count needs every record's hash, "
                             f"which a partition does not see; use --eval-fraction with "
                             f"--num-partitions")
    if "://" in str(getattr(cfg, "out", "")):
        raise PacktrainError(f"{cfg.out}: an eval split is written to OUT/{EVAL_DIR}/, which "
                             f"is not uploaded; build it into a local directory")
    return EvalRule(None if frac is None else float(frac), None if n is None else int(n),
                    int(seed))


def canonical(record: Any) -> bytes:
    """The content of a record that its hash covers: JSON with sorted keys, no spaces, UTF-8
    (values JSON cannot hold, e.g. a Parquet timestamp, as their text)."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                      default=str).encode("utf-8")


def record_hashes(records: list, seed: int) -> np.ndarray:
    """The split hash of each record (uint64)."""
    key = int(seed).to_bytes(8, "little")
    out = np.empty(len(records), dtype=np.uint64)
    for i, rec in enumerate(records):
        d = hashlib.blake2b(canonical(rec), digest_size=8, key=key).digest()
        out[i] = int.from_bytes(d, "big")
    return out


def fraction_bound(fraction: float) -> int:
    """``floor(fraction * 2**64)``, exactly (a power-of-two scaling of a float); below 2**64."""
    return min(int(float(fraction) * _SCALE), 2 ** 64 - 1)


def choose(hashes: np.ndarray, rule: EvalRule) -> tuple[np.ndarray, int]:
    """Which samples (by their records' hashes) are held out, and the hash bound (exclusive)
    used. ``--eval-records N`` takes the N smallest hashes, except that copies of one record
    straddling the boundary all stay in training (identical records never end up on both
    sides), so it can hold out fewer than N."""
    if rule.records is None:
        threshold = fraction_bound(rule.fraction)
        mask = hashes < np.uint64(threshold)
        flag = f"--eval-fraction {rule.fraction}"
    else:
        n = rule.records
        if n >= len(hashes):
            raise PacktrainError(f"--eval-records {n}: the build has only {len(hashes)} samples; "
                                 f"hold out fewer records")
        threshold = int(np.partition(hashes, n)[n])  # the (n+1)-th smallest hash
        mask = hashes < np.uint64(threshold)
        flag = f"--eval-records {n}"
    held = int(np.count_nonzero(mask))
    if held == 0:
        raise PacktrainError(f"{flag}: no record of the {len(hashes)} samples falls in the eval "
                             f"split; hold out more (or use more data)")
    if held == len(hashes):
        raise PacktrainError(f"{flag}: every one of the {len(hashes)} samples falls in the eval "
                             f"split, none is left to train on; hold out fewer")
    return mask, threshold


def parent_entry(eval_manifest: dict, manifest_sha256: str, split: dict) -> dict[str, Any]:
    """The parent manifest's ``eval`` field: where the eval dataset is and how it was made."""
    s = eval_manifest["stats"]
    return {"path": EVAL_DIR, "manifest_sha256": manifest_sha256, "split": split,
            "samples": s["samples_packed"], "packs": s["packs"], "tokens": s["tokens"]}


def summary_line(manifest: dict) -> str | None:
    """The closing summary's line on the eval dataset (None without one)."""
    e = manifest.get("eval")
    if not e:
        return None
    where = Path(str(manifest.get("arguments", {}).get("out", "."))) / e["path"]
    return (f"eval            {where}: {e['samples']:,} samples held out "
            f"({e['split']['rule']} rule), {e['packs']:,} packs, {e['tokens']:,} tokens")


def _rule_text(split: dict) -> str:
    how = (f"fraction {split['fraction']}" if split["rule"] == "fraction"
           else f"{split['records']} records")
    return f"{how}, eval seed {split['seed']}"


def eval_note(manifest: dict) -> str | None:
    """One line on a dataset's eval split, or on the dataset being one (None otherwise)."""
    e, of = manifest.get("eval"), manifest.get("eval_of")
    if e:
        return (f"{e['samples']:,} samples held out into {e['path']}/ ({_rule_text(e['split'])});"
                f" {e['packs']:,} packs, {e['tokens']:,} tokens")
    if of:
        return (f"the eval split of the dataset in {of['parent']}/ ({_rule_text(of['split'])}); "
                f"none of its records is in that dataset")
    return None
