"""Small helpers shared by the benchmark scripts: where results go, a plain-text table, JSON output,
what machine and memory the numbers come from."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a fresh clone, without installing
    sys.path.insert(0, str(ROOT))


def environment() -> dict:
    """What the numbers were measured on."""
    import numpy

    return {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Render ``rows`` as an aligned text table. ``columns``: (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([format(row[k], f) if row.get(k) is not None else "-" for k, _, f in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    left = [f == "s" for _, _, f in columns]  # text left, numbers right
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if left[i] else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(name: str, obj: dict) -> Path:
    """Write ``obj`` to ``benchmarks/results/<name>`` (pretty, stable key order) and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def cpu_name() -> str:
    """The CPU model, for the record of where a benchmark ran."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def proc_status(key: str) -> int | None:
    """A /proc/self/status memory field (VmRSS, VmHWM, ...) in bytes, or None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None (with a note) when the optional
    plot extra is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
