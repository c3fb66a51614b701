"""Start train-run on N local ranks (`--nproc N`) with torch.distributed.run (torchrun).

The parent process re-launches ``python -m train.cli ARGS`` (without --nproc) N times through
torchrun's elastic agent (``--standalone``: a free local rendezvous port), with
OMP_NUM_THREADS = max(1, cores // N) per rank unless already set (without it N ranks each use
every core and on a small machine steps get ~30x slower). A rank that fails makes the agent stop
the others; the launcher then exits with that rank's exit code (non-zero).

SIGTERM/SIGINT to the launcher: the agent forwards the signal to every rank and waits up to
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default here 300, torchrun's own default is 30) before
SIGKILL; the ranks checkpoint at the end of their step and exit 75 (train.dist). The launcher then
exits 75 if rank 0 recorded the checkpoint (OUTPUT/preempted.json naming this launch), 143
otherwise. If the launcher itself is SIGKILLed, each rank notices within a second and exits.

Under an external launcher (torchrun, the deepspeed launcher, SLURM srun) do not pass --nproc:
each process is one rank and reads RANK/WORLD_SIZE/LOCAL_RANK (or SLURM_*) itself (train.dist).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from pathlib import Path

PREEMPT_GRACE_S = 300


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


def _preempt_recorded(output: str | None, launch_id: str) -> bool:
    """True when rank 0 wrote OUTPUT/preempted.json during this launch."""
    from train.dist import PREEMPTED_FILE

    if not output:
        return False
    try:
        info = json.loads((Path(output) / PREEMPTED_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("launch_id") == launch_id


def _describe(failures: dict) -> str:
    """'rank 0 exited with code 1, rank 1 was killed by SIGKILL' from the agent's failures."""
    import signal

    parts = []
    for rank, f in sorted(failures.items()):
        c = f.exitcode
        if isinstance(c, int) and c < 0:
            try:
                parts.append(f"rank {rank} was killed by {signal.Signals(-c).name}")
                continue
            except ValueError:
                pass
        parts.append(f"rank {rank} exited with code {c}")
    return ", ".join(parts) or "a rank failed"


def launch_local(nproc: int, argv: list[str], output: str | None = None,
                 module: str = "train.cli") -> int:
    """Run `python -m MODULE argv` (train-run's train.cli; pack-ref's train.pack_ref) on `nproc`
    local ranks; returns the exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from train.dist import PREEMPTED_EXIT

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count() // nproc)))
    launch_id = uuid.uuid4().hex
    os.environ["PACKTRAIN_LAUNCH_ID"] = launch_id  # inherited by the ranks
    grace = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(PREEMPT_GRACE_S))
    targs = parse_args(["--standalone", f"--nproc_per_node={nproc}", f"--shutdown-timeout={grace}",
                        "--module", module, *strip_nproc(argv)])
    # torch's elastic loggers set their own levels (LOGLEVEL); the ranks' lines say what happened
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(targs)
    except ChildFailedError as e:
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        # the agent SIGTERMs ranks still exiting once one has exited 75: the checkpoint is whole
        # when rank 0 recorded it for this launch
        if PREEMPTED_EXIT in codes and _preempt_recorded(output, launch_id):
            return PREEMPTED_EXIT  # rank 0 printed the one-line message
        # a rank's own exit code (2: user error) over the signals the agent then sent the others
        code = next((c for c in codes if isinstance(c, int) and c > 0 and c != PREEMPTED_EXIT),
                    1)
        print(f"error: {_describe(e.failures)}; see their output above", file=sys.stderr)
        return code if isinstance(code, int) and code > 0 else 1
    except SignalException as e:
        if _preempt_recorded(output, launch_id):
            return PREEMPTED_EXIT
        print(f"error: {e.sigval.name} received; the ranks stopped without writing a checkpoint "
              f"(resume from the last one with --resume auto)", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0
