"""Test and debug hooks of train-run, read from the environment once, when a run starts.

Off unless set; a run without them pays one empty check per step.

* PACKTRAIN_FAULTPOINT (test-only; comma-separated): `kill-after-step:N[@R]` SIGKILLs rank R
  (default 0) after optimizer step N, before any checkpoint of it; `kill-in-ckpt:N[@R]` after
  DeepSpeed wrote step N's files, before our state file and `latest`; `stop-after-step:N[@R]`
  SIGSTOPs it (a hung rank); `step-sleep:S` sleeps S seconds before every step (a window for tests
  to send signals mid-run). tests/system/test_faults_train.py drives them. pack-ref:
  `kill-after-shard:N[@R]` SIGKILLs rank R after its N-th sidecar shard of this run
  (tests/train/test_pack_ref.py).
* PACKTRAIN_DEBUG_PACKS=DIR: each rank appends the pack ids of every step to
  DIR/packs-rankR.jsonl (tests and the demo check which packs each rank trained on).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pack.errors import PacktrainError

FAULTPOINT_ENV = "PACKTRAIN_FAULTPOINT"
DEBUG_PACKS_ENV = "PACKTRAIN_DEBUG_PACKS"

Faultpoint = tuple[str, float, int | None]  # (name, value, rank or None: rank 0)


def parse_faultpoints() -> list[Faultpoint]:
    """Parse PACKTRAIN_FAULTPOINT (see the module doc) into (name, value, rank or None)."""
    spec = os.environ.get(FAULTPOINT_ENV, "").strip()
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        m = re.fullmatch(r"(kill-after-step|kill-in-ckpt|stop-after-step|step-sleep|kill-after-shard):"
                         r"([0-9.]+)(?:@(\d+))?", item)
        if not m:
            raise PacktrainError(f"{FAULTPOINT_ENV}={spec!r}: cannot parse {item!r}; expected "
                                 f"kill-after-step:N[@R], kill-in-ckpt:N[@R], stop-after-step:N[@R], "
                                 f"step-sleep:SECONDS or kill-after-shard:N[@R] (a test-only "
                                 f"setting: unset it)")
        out.append((m.group(1), float(m.group(2)), None if m.group(3) is None else int(m.group(3))))
    return out


@dataclass(frozen=True)
class Hooks:
    """The hooks of one run; the default (no fault points, no pack log) does nothing."""

    faultpoints: tuple[Faultpoint, ...] = ()
    debug_packs: Path | None = None

    @classmethod
    def from_env(cls) -> Hooks:
        """Read both settings; a malformed PACKTRAIN_FAULTPOINT is a PacktrainError here, before
        any work."""
        debug = os.environ.get(DEBUG_PACKS_ENV)
        return cls(tuple(parse_faultpoints()), Path(debug) if debug else None)

    @property
    def step_sleep(self) -> float:
        """Seconds to sleep before every step (0.0: none)."""
        return sum(v for name, v, _ in self.faultpoints if name == "step-sleep")

    def fault(self, name: str, step: int, rank: int) -> None:
        """SIGKILL or SIGSTOP this process if a fault point `name` is set for `step` and `rank`."""
        for fname, value, frank in self.faultpoints:
            if fname != name or int(value) != step or (frank if frank is not None else 0) != rank:
                continue
            print(f"faultpoint {name}:{step} rank {rank} pid {os.getpid()}", file=sys.stderr,
                  flush=True)
            os.kill(os.getpid(), signal.SIGSTOP if name.startswith("stop") else signal.SIGKILL)

    def start_pack_log(self) -> None:
        if self.debug_packs is not None:
            self.debug_packs.mkdir(parents=True, exist_ok=True)

    def log_packs(self, step: int, epoch: int, rank: int, pack_ids: Sequence[list[int]]) -> None:
        """Append one step's pack ids (one list per micro-batch) to the pack log."""
        if self.debug_packs is None:
            return
        with open(self.debug_packs / f"packs-rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, "rank": rank,
                                "micro": list(pack_ids)}) + "\n")
