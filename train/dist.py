"""Distributed start-up, rank-0 helpers, and how a rank stops: SIGTERM and the launcher watchdog.

Distributed start-up
--------------------
`train-run` works with no launcher (single process; defaults RANK=0, WORLD_SIZE=1, LOCAL_RANK=0,
MASTER_ADDR=127.0.0.1, MASTER_PORT=a free port), under torchrun / the deepspeed launcher (their
variables are used as they are), and under SLURM `srun` (one task per GPU): when RANK/WORLD_SIZE
are unset, SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID give RANK/WORLD_SIZE/LOCAL_RANK, MASTER_ADDR is
the first host of SLURM_JOB_NODELIST (via `scontrol show hostnames` when available) and
MASTER_PORT defaults to 29500 + SLURM_JOB_ID % 1000 (every task computes the same value; set
MASTER_PORT yourself to override). Backend: gloo on CPU, nccl on CUDA. Every collective has a
timeout of --dist-timeout seconds (default 1800), so a rank whose peer died or hangs fails instead
of waiting forever, even with no launcher watching.

Stopping
--------
* SIGTERM (SLURM / Kubernetes preemption; torchrun forwards it to every rank) sets a flag
  (`StopRequest`); at the next step boundary the ranks agree on it (one all-reduce), write a
  checkpoint and raise `Preempted` (train-run exits with PREEMPTED_EXIT = 75 after one line on
  stderr); rank 0 also writes OUTPUT/preempted.json. A second SIGTERM kills at once. Bound: the
  rest of the current step plus one checkpoint.
* Under torchrun's elastic agent (train-run --nproc, torchrun) each rank watches its parent
  (`watch_launcher`): if the agent is killed (SIGKILL gives it no chance to stop its workers,
  which run in their own sessions) the rank exits within a second instead of training on as an
  orphan.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch

from pack.errors import PacktrainError

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on purpose with a checkpoint; rerun with --resume auto
PREEMPTED_FILE = "preempted.json"  # OUTPUT/preempted.json: rank 0's record of the stop
DEFAULT_DIST_TIMEOUT = 1800


class Preempted(Exception):
    """Training stopped on SIGTERM after writing the checkpoint `checkpoint` at `step`."""

    def __init__(self, step: int, checkpoint: Path, signame: str = "SIGTERM"):
        super().__init__(f"preempted: {signame} received; stopped after step {step} with checkpoint "
                         f"{checkpoint}; continue with --resume auto (exit code {PREEMPTED_EXIT})")
        self.step, self.checkpoint = step, checkpoint


def log0(msg: str) -> None:
    """Print on rank 0 only (from RANK, so it works before the process group exists)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, flush=True)


# ---------------------------------------------------------------- distributed start-up

def free_port() -> int:
    """A TCP port free on this host now (for MASTER_PORT of a single-host run)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # "node[01-04,07],gpu3" -> "node01"
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    m = re.match(r"^([^\[]+)\[([^\],\-]+)", first)
    return m.group(1) + m.group(2) if m else first


def distributed_env() -> dict[str, str]:
    """The RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT values to use (see module doc)."""
    env = os.environ
    out: dict[str, str] = {}
    if "RANK" not in env or "WORLD_SIZE" not in env:
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            out["RANK"] = env["SLURM_PROCID"]
            out["WORLD_SIZE"] = env["SLURM_NTASKS"]
            out["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
            if "MASTER_ADDR" not in env:
                nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
                out["MASTER_ADDR"] = _first_slurm_host(nodelist)
            if "MASTER_PORT" not in env:
                out["MASTER_PORT"] = str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000)
        else:
            out.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            if "MASTER_ADDR" not in env:
                out["MASTER_ADDR"] = "127.0.0.1"
            if "MASTER_PORT" not in env:
                out["MASTER_PORT"] = str(free_port())
    elif "LOCAL_RANK" not in env:
        out["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    return out


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(timeout_s: float = DEFAULT_DIST_TIMEOUT) -> Dist:
    """Initialise the process group; every collective then fails after `timeout_s` seconds
    without its peers instead of hanging."""
    os.environ.update(distributed_env())
    # DeepSpeed 0.19 calls collectives torch 2.13 renamed; one warning per call is noise
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                            category=FutureWarning)
    import deepspeed
    import torch.distributed as tdist

    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not tdist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    return Dist(tdist.get_rank(), tdist.get_world_size(), local_rank, device)


def close_distributed_at_exit() -> None:
    """After a finished run: destroy the process group when the interpreter exits (atexit, so
    that several runs in one process share the group). Left to exit-time destructors, a rank
    once aborted after a complete ZeRO-2 run and its export (SIGABRT, "terminate called without
    an active exception": a communication thread torn down while still joinable), which turned
    a finished run into a failed launch. Only after success: a rank that fails exits without
    waiting on peers that may be stuck in a collective."""
    import atexit

    atexit.unregister(_close_distributed)  # registered once, however many runs finish
    atexit.register(_close_distributed)


def _close_distributed() -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.barrier()


def all_reduce_sum(values: list[float], device: torch.device,
                   dtype: torch.dtype = torch.float64) -> list[float]:
    """`values` summed over all ranks (float64 by default: token counts stay exact)."""
    return sum_over_ranks(torch.tensor(values, dtype=dtype, device=device)).tolist()


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over all ranks, in place, on its device: nothing is read back to the host."""
    import torch.distributed as tdist

    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def on_rank0(dist: Dist, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only, then synchronise. If it raises, rank 0 re-raises and the other
    ranks raise too, instead of waiting forever in the next collective."""
    result, failed, err = None, 0.0, None
    if dist.is_main:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            failed, err = 1.0, e
    if all_reduce_sum([failed], dist.device)[0] > 0:
        if err is not None:
            raise err
        raise PacktrainError("rank 0 failed (see its error); stopping this rank too")
    return result


# ---------------------------------------------------------------- stopping

class StopRequest:
    """SIGTERM handler for one rank: the first signal sets `requested` (acted on at the next step
    boundary, see train.loop), a second one terminates at once. Restores the old handler on exit."""

    def __init__(self) -> None:
        self.requested = False
        self.signame = "SIGTERM"
        self._old: Any = None

    def _handler(self, signum, frame) -> None:
        if self.requested:  # the user (or the scheduler) insists
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = True
        self.signame = signal.Signals(signum).name
        print(f"rank {os.environ.get('RANK', '0')}: {self.signame} received; writing a checkpoint "
              f"at the end of this step", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)
        return self

    def release(self) -> None:
        """Back to the previous handler (after the last checkpoint nothing is left to save)."""
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None

    def __exit__(self, *exc) -> None:
        self.release()


_watchdog_started = False


def watch_launcher() -> None:
    """Under torchrun's elastic agent, exit if the agent dies: its workers run in their own
    sessions, so a SIGKILLed agent would otherwise leave them training (or hanging) as orphans."""
    global _watchdog_started
    if _watchdog_started or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()
    if parent == 1:
        return

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                print(f"error (rank {os.environ.get('RANK', '?')}): the launcher (pid {parent}) "
                      f"is gone; stopping this rank", file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="packtrain-launcher-watchdog", daemon=True).start()
    _watchdog_started = True
