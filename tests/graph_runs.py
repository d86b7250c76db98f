"""Running whole graphs from tests: the tiny configs, `gendag` in-process (through typer's
CliRunner, on the session's Prefect server and Ray) or as a separate process that a test can
kill, and waiting for what a run leaves on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from typer.testing import CliRunner

from flows.cli import app

MOONS = ["run", "flow-matching", "-c", "flow-matching/gaussians-to-moons", "--scale", "tiny"]
DIGITS = ["run", "flow-matching", "-c", "flow-matching/digits", "--scale", "tiny"]


def gendag(*args: str) -> dict:
    """Run `gendag` in-process; it must succeed. Returns its summary.json."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "summary.json").read_text())


def gendag_output(*args: str) -> str:
    """Run `gendag` in-process; it must succeed. Returns what it printed."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.output


def gendag_error(*args: str) -> str:
    """Run `gendag` in-process; it must fail with exit code 2 and one line on stderr (no
    traceback; stdout may show the progress made before). Returns the line."""
    result = CliRunner().invoke(app, list(args))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
        f"exit {result.exit_code}:\n{result.output}\n{result.exception!r}"
    return lines[0]


def start_gendag(workspace: Path, *args: str, output=subprocess.DEVNULL) -> subprocess.Popen:
    """`gendag` as a separate process with its own Prefect server and Ray, in a session of its
    own so that `kill_group` takes down everything it started; what it prints goes to `output`."""
    env = {**os.environ, "PREFECT_HOME": str(workspace / "prefect-child")}
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, cwd=workspace,
                            stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(child: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (its Ray, its Prefect server)."""
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def wait_for(found: Callable[[], object], what: str, child: subprocess.Popen | None = None,
             timeout: float = 300, poll: float = 0.005):
    """Poll until `found()` is truthy and return it; the child (if any) must still be running."""
    deadline = time.time() + timeout
    while not (result := found()):
        assert child is None or child.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)
    return result
