"""Start train-run on N local ranks (`--nproc N`) with torch.distributed.run (torchrun).

The parent process re-launches ``python -m train.cli ARGS`` (without --nproc) N times through
torchrun's elastic agent (``--standalone``: a free local rendezvous port), with
OMP_NUM_THREADS = max(1, cores // N) per rank unless already set (without it N ranks each use
every core and on a small machine steps get ~30x slower). A rank that fails makes the agent stop
the others; the launcher then exits with that rank's exit code (non-zero).

Under an external launcher (torchrun, the deepspeed launcher, SLURM srun) do not pass --nproc:
each process is one rank and reads RANK/WORLD_SIZE/LOCAL_RANK (or SLURM_*) itself (train.loop).
"""

from __future__ import annotations

import logging
import os
import sys


def in_launched_rank() -> bool:
    """True when this process is already one rank of a launched job."""
    env = os.environ
    return ("RANK" in env and "WORLD_SIZE" in env) or "SLURM_PROCID" in env and int(
        env.get("SLURM_NTASKS", "1")) > 1


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def launch_local(nproc: int, argv: list[str]) -> int:
    """Run `python -m train.cli argv` on `nproc` local ranks; returns the exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count() // nproc)))
    targs = parse_args(["--standalone", f"--nproc_per_node={nproc}", "--module", "train.cli",
                        *strip_nproc(argv)])
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    try:
        run(targs)
    except ChildFailedError as e:
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        code = next((c for c in codes if c not in (0, None)), 1)
        ranks = ", ".join(str(r) for r in sorted(e.failures))
        print(f"error: rank(s) {ranks} failed (exit code {code}); see their output above",
              file=sys.stderr)
        return code if isinstance(code, int) and code > 0 else 1
    return 0
