"""Where things live, and the embedded defaults for every service.

Nothing here starts a server. Each service is embedded unless its standard
variable points elsewhere:

- Prefect: `PREFECT_API_URL` (unset -> a temporary local server under PREFECT_HOME)
- Ray: `RAY_ADDRESS` (unset -> a local instance sized to this machine)
- MLflow: `MLFLOW_TRACKING_URI` (unset -> SQLite file `mlflow.db` in the workspace)
- DVC: `GENDAG_DVC_REMOTE` (unset -> a local folder in the workspace), used only when
  the workspace's DVC repo has no default remote yet.

The workspace is `GENDAG_HOME` (default: the current directory).
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_V2_ENABLED": "1",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "DO_NOT_TRACK": "1",
    "TQDM_DISABLE": "1",
    "PYTHONWARNINGS": "ignore",
}


_CLAIMS: dict[str, threading.Lock] = {}
_CLAIMS_GUARD = threading.Lock()


@contextmanager
def claimed(key: str):
    """Hold `key` (a folder being made: a dataset version, a model, a coupling set) against the
    other threads of this process while the body checks for it and makes it: two table cells
    running side by side that need the same thing make it once, and the second finds it made."""
    with _CLAIMS_GUARD:
        lock = _CLAIMS.setdefault(key, threading.Lock())
    with lock:
        yield


class RunError(RuntimeError):
    """A run that cannot finish for a reason the user has to act on (a full disk, an unavailable
    store, a training worker that kept failing, non-finite numbers), phrased as one line."""


class Interrupted(RunError):
    """The person running gendag stopped it (Ctrl-C); what it had finished, and the last
    checkpoint of what it had not, are kept for the same command to resume."""


class NonFiniteError(RunError):
    """A NaN or an infinity where a number must be finite: a training loss, a sample, a score.
    Such a number is an error, never a result."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (or its type's name)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def require_finite(values: dict[str, float], what: str) -> None:
    """Raise `NonFiniteError` naming the first of `values` (name -> number) that is NaN or infinite."""
    import math

    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise NonFiniteError(f"{what}: {bad[0]} = {values[bad[0]]}{more}; a non-finite number is never a result")


# Errors of a write that found no room: no space, over quota, over the file size limit.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def disk_full_error(error: OSError) -> RunError:
    """A write that found no room, as one line naming the file."""
    where = f" writing {error.filename}" if error.filename else ""
    return RunError(f"no room on disk{where} ({error.strerror}); finished work is kept and partial files "
                    "are never used: free some space and run the same command again")


def home() -> Path:
    return Path(os.environ.get("GENDAG_HOME", ".")).resolve()


def store() -> Path:
    """Private working area of gendag inside the workspace (runs, checkpoints, caches)."""
    return home() / ".gendag"


def tracking_uri() -> str:
    """MLflow's store: MLFLOW_TRACKING_URI, else the workspace's SQLite file."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def configure_environment() -> None:
    """Set embedded defaults before Prefect/Ray/MLflow are imported; user settings win."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(store() / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri())


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_digest(folder: Path) -> str:
    """Content hash of a folder: names and bytes of every file, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(file_digest(path).encode())
    return h.hexdigest()


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """A nested dict as `a.b.c` -> value (an empty dict stays a value)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def short_hash(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Ref:
    """What tasks pass each other: a file or folder, its content hash, and who made it."""

    kind: str
    uri: str
    hash: str
    config_hash: str = ""

    @property
    def path(self) -> Path:
        return Path(self.uri)

    def as_dict(self) -> dict:
        return asdict(self)
