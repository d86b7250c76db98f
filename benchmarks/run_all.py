"""Run every benchmark (each in its own process) and print one table of results.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only a,c] [--json results.json]

(a) parallel_sampling.py   (b) orchestration_overhead.py   (c) solver_overhead.py   (d) ot_coupling.py
(h) coupling_generation.py
Each script can also be run alone; see its docstring. `--quick` is passed on.
(e) fid_protocol_noise.py, (f) ddim_table.py and (g) parallel_picard.py measure a finished run's
model (`--run <run folder>`), so they are run alone, after the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

HERE = Path(__file__).resolve().parent
BENCHMARKS = {  # letter -> (script, headline keys shown in the table)
    "a": ("parallel_sampling.py", ["speed-up (incl. actor start-up)", "speed-up (sampling only)",
                                   "ceiling (2 plain processes, no Ray)", "1 worker s", "2 workers s"]),
    "b": ("orchestration_overhead.py", ["ratio graph/bare", "graph s", "bare s"]),
    "c": ("solver_overhead.py", ["worst"]),
    "d": ("ot_coupling.py", ["long run (3000 steps) OT pooled x", "OT synchronous x", "OT prefetch, 1 thread x",
                             "OT prefetch, 2 threads x",
                             "independent ms/step"]),
    "h": ("coupling_generation.py", ["speed-up", "identical sets", "1 worker s", "2 workers s"]),
}
ORDER = "cdabh"


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated letters, e.g. a,c")
    args = p.parse_args()
    chosen = [x.strip() for x in args.only.split(",") if x.strip()] or list(ORDER)
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for letter in sorted(chosen, key=ORDER.index):
            script, _ = BENCHMARKS[letter]
            out = Path(d) / f"{letter}.json"
            cmd = [sys.executable, str(HERE / script), "--json", str(out)] + (["--quick"] if args.quick else [])
            print(f"\n===== ({letter}) {script}   {C.uptime()}", flush=True)
            t = time.perf_counter()
            proc = subprocess.run(cmd)
            elapsed = time.perf_counter() - t
            if proc.returncode or not out.exists():
                results[letter] = {"benchmark": script, "error": f"exit code {proc.returncode}", "elapsed_s": elapsed}
                continue
            results[letter] = json.loads(out.read_text()) | {"elapsed_s": elapsed}
    rows = []
    for letter in sorted(results, key=ORDER.index):
        r = results[letter]
        if "error" in r:
            rows.append([f"({letter})", r["benchmark"], r["error"], "", "", f"{r['elapsed_s']:.0f}"])
            continue
        keys = BENCHMARKS[letter][1]
        measured = "; ".join(f"{k} {r['summary'][k]}" for k in keys if k in r["summary"])
        rows.append([f"({letter})", r["target"], measured, "PASS" if r["summary"].get("pass") else "MISS",
                     r["load_end"].removeprefix("load average: "), f"{r['elapsed_s']:.0f}"])
    C.print_table("benchmarks" + (" (quick)" if args.quick else ""),
                  ["", "target", "measured", "result", "load (1/5/15 min) at end", "s"], rows)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
