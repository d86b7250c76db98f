"""Helpers shared by the benchmark scripts: arguments, machine load, timing, results.

Every benchmark script prints its own table and, with ``--json PATH``, writes its
results as JSON so that ``benchmarks/run_all.py`` can collect them into one table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ first, not the repo
    sys.path.insert(0, str(ROOT))


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a fast, smaller version (for smoke tests)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return p


def uptime() -> str:
    """`uptime`'s load part, e.g. 'load average: 0.10, 0.30, 0.25'."""
    try:
        out = subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
        return out[out.index("load average"):]
    except (OSError, ValueError, subprocess.CalledProcessError):
        one, five, fifteen = os.getloadavg()
        return f"load average: {one:.2f}, {five:.2f}, {fifteen:.2f}"


def load1() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float = 1.0, timeout: float = 0.0) -> None:
    """Optionally wait (up to `timeout` s) for the 1-minute load to drop below `max_load`."""
    end = time.time() + timeout
    while time.time() < end and load1() > max_load:
        time.sleep(5)


def timeit(fn, repeat: int, number: int = 1) -> list[float]:
    """Seconds per call of `fn`, `repeat` samples of `number` calls each."""
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        out.append((time.perf_counter() - t) / number)
    return out


def median(xs) -> float:
    return statistics.median(xs)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, r in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if k and i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def finish(args, name: str, target: str, summary: dict, details: dict) -> None:
    """Print the headline and write the JSON record (`summary` holds the headline numbers)."""
    record = {
        "benchmark": name,
        "target": target,
        "summary": summary,
        "details": details,
        "quick": bool(getattr(args, "quick", False)),
        "load_end": uptime(),
        "command": " ".join([".venv/bin/python", *[_rel(a) for a in sys.argv]]),
    }
    print(f"\n[{name}] target: {target}")
    for k, v in summary.items():
        print(f"[{name}] {k}: {_fmt(v)}")
    print(f"[{name}] machine: {record['load_end']}")
    if args.json:
        args.json.write_text(json.dumps(record, indent=1, default=str))


def _rel(arg: str) -> str:
    try:
        return str(Path(arg).resolve().relative_to(ROOT))
    except ValueError:
        return arg
