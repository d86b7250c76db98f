"""The team's shared services on one machine, all state under one folder: PostgreSQL (the
binaries the `pgserver` package ships), an MLflow tracking server on it, a Prefect server and a
Ray cluster of a head and one worker node. `gendag services up | status | down` drives them.

Every service is found again by what it left in the folder (a pid file, PostgreSQL's
postmaster.pid, Ray's temp dir), so `up` leaves what is already up running, and `down` stops
only these processes, never another Ray or server on the machine."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.infra import QUIET_ENV, RunError, home, short_hash

ROOT = Path(__file__).resolve().parents[1]  # the code the Ray nodes import
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 600.0  # a first start migrates two databases; slow on a loaded 2-core machine
STOP_TIMEOUT_S = 20.0
PG_SYSTEM_USER = "pgserver"  # postgres refuses to run as root: as root, it runs as this user
# Ray ports after its GCS port: head node manager, object manager, agent, dashboard; the worker's
RAY_PORTS = ("head_node_manager", "head_object_manager", "head_agent", "dashboard",
             "worker_node_manager", "worker_object_manager", "worker_agent")


class ServiceError(RunError):
    """A service that cannot be started or stopped, in one line."""


def default_dir() -> Path:
    return home() / ".gendag" / "services"


@dataclass(frozen=True)
class Layout:
    """Where the services live and listen; written to `services.json` by `up`."""

    dir: Path
    host: str = "127.0.0.1"
    postgres_port: int = 5433
    mlflow_port: int = 5000
    prefect_port: int = 4200
    ray_port: int = 6380

    @classmethod
    def load(cls, folder: Path) -> "Layout":
        """The layout `up` used in `folder` (the defaults if it never ran there)."""
        file = folder / "services.json"
        saved = json.loads(file.read_text()) if file.is_file() else {}
        return cls(**{**saved, "dir": folder})

    def save(self) -> None:
        fields = {k: v for k, v in asdict(self).items() if k != "dir"}
        (self.dir / "services.json").write_text(json.dumps(fields, indent=1))

    def ray_ports(self) -> dict[str, int]:
        return {name: self.ray_port + 1 + i for i, name in enumerate(RAY_PORTS)}

    @property
    def ray_tmp(self) -> Path:
        """Ray's temp dir: short (its unix sockets live under it), named by the folder, linked from it."""
        return Path("/tmp") / f"gendag-ray-{short_hash(self.dir.resolve())[:8]}"

    def env(self) -> dict[str, str]:
        """What a workstation sets to use these services."""
        return {
            "MLFLOW_TRACKING_URI": f"http://{self.host}:{self.mlflow_port}",
            "PREFECT_API_URL": f"http://{self.host}:{self.prefect_port}/api",
            "RAY_ADDRESS": f"{self.host}:{self.ray_port}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.dir / "ray" / "auth_token"),
        }


# --------------------------------------------------------------------------- helpers


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def require_port(host: str, port: int, option: str) -> None:
    if not port_free(host, port):
        raise ServiceError(f"port {port} on {host} is taken by another process: free it or choose another with {option}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def alive(pid: int | None) -> bool:
    import psutil

    return bool(pid) and psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def read_pid(file: Path) -> int | None:
    try:
        return int(file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def wait_until(check, what: str, log: Path, timeout: float = START_TIMEOUT_S) -> None:
    """Poll `check` until it is true; else a one-line error pointing at the service's log."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise ServiceError(f"{what} did not answer within {timeout:.0f} s; see {log}")
        time.sleep(1.0)


def terminate(pids: list[int], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM `pids` (and their process groups when they lead one), SIGKILL what is left after `timeout`."""
    import psutil

    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
            procs += psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(procs, timeout=timeout)
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=5)


def pg_bin() -> Path:
    """The folder of the PostgreSQL binaries `pgserver` ships (imported without its warning about
    XDG_RUNTIME_DIR: its own server class, which wants that directory, is not used)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver._commands import POSTGRES_BIN_PATH
    return POSTGRES_BIN_PATH


def service_env(**extra: str | None) -> dict[str, str]:
    """This process's environment, quiet, with `extra` (a None removes the variable)."""
    env = {**os.environ, **QUIET_ENV, **extra}
    return {k: v for k, v in env.items() if v is not None}


# --------------------------------------------------------------------------- services


class Service:
    """One service: its address, its pid, whether it answers; start and stop it."""

    name = ""
    option = ""  # the option that sets its port

    def __init__(self, layout: Layout):
        self.layout = layout
        self.folder = layout.dir / self.name
        self.log = self.folder / f"{self.name}.log"

    @property
    def port(self) -> int:
        return getattr(self.layout, f"{self.name}_port")

    @property
    def address(self) -> str:
        return f"{self.layout.host}:{self.port}"

    def pids(self) -> list[int]:
        pid = read_pid(self.folder / f"{self.name}.pid")
        return [pid] if alive(pid) else []

    def answers(self) -> bool:
        raise NotImplementedError

    def detail(self) -> str:
        """What `status` adds about it."""
        return ""

    def is_up(self) -> bool:
        return bool(self.pids()) and self.answers()

    def launch(self) -> None:
        """Start the service (in the background when it has a process of its own)."""
        raise NotImplementedError

    def wait(self) -> None:
        wait_until(self.answers, f"{self.name} on {self.address}", self.log)

    def stop(self) -> None:
        terminate(self.pids())

    def spawn(self, args: list[str], **env: str) -> None:
        """Run `args` in the background, in a session of its own, its output in the log and its pid in the pid file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=service_env(**env), cwd=self.folder, start_new_session=True)
        (self.folder / f"{self.name}.pid").write_text(f"{proc.pid}\n")


class Postgres(Service):
    """PostgreSQL from the `pgserver` package's binaries: initdb once, pg_ctl start/stop, a
    password (in the folder, mode 0600) for TCP logins, and the `mlflow` database."""

    name, option = "postgres", "--postgres-port"

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def password(self) -> str:
        return (self.folder / "password").read_text().strip()

    def uri(self, database: str = "mlflow", driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://postgres:{self.password}@{self.address}/{database}"

    def pids(self) -> list[int]:
        pid = read_pid(self.data / "postmaster.pid")
        return [pid] if alive(pid) else []

    def answers(self) -> bool:
        return self._run("pg_isready", "-h", self.layout.host, "-p", str(self.port), check=False).returncode == 0

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        user = PG_SYSTEM_USER if os.geteuid() == 0 else None
        result = subprocess.run([str(pg_bin() / tool), *args], capture_output=True, text=True, user=user,
                                stdin=subprocess.DEVNULL, cwd=self.folder)
        if check and result.returncode:
            said = (result.stderr or result.stdout).strip().splitlines() or [f"exit code {result.returncode}"]
            raise ServiceError(f"postgres: {tool} failed: {said[-1]} (see {self.log})")
        return result

    def _as_root(self) -> None:
        """As root, postgres runs as PG_SYSTEM_USER: it must own its folder and reach it and the binaries."""
        import pwd

        binaries = pg_bin()
        from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists(PG_SYSTEM_USER)
        ensure_prefix_permissions(self.folder)
        ensure_prefix_permissions(binaries)
        ensure_folder_permissions(binaries, 0o055)
        ensure_folder_permissions(binaries.parent / "lib", 0o044)
        user = pwd.getpwnam(PG_SYSTEM_USER)
        for path in (self.folder, *self.folder.rglob("*")):
            os.chown(path, user.pw_uid, user.pw_gid)

    def launch(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "password").is_file():
            (self.folder / "password").write_text(secrets.token_hex(16) + "\n")
            (self.folder / "password").chmod(0o600)
        if os.geteuid() == 0:
            self._as_root()
        if not (self.data / "PG_VERSION").is_file():
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=scram-sha-256", "--encoding=utf8",
                      f"--pwfile={self.folder / 'password'}")
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write("unix_socket_directories = ''\n")  # TCP only: no socket path to outgrow
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(int(START_TIMEOUT_S)),
                  "-o", f"-h {self.layout.host} -p {self.port}")

    def wait(self) -> None:
        super().wait()
        self.create_database("mlflow")

    def create_database(self, name: str) -> None:
        import psycopg2

        connection = psycopg2.connect(self.uri("postgres", "postgresql"))
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()

    def stop(self) -> None:
        if self.pids():
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", str(int(STOP_TIMEOUT_S)))


class MLflow(Service):
    """The MLflow tracking server on the PostgreSQL store, serving artifacts from the folder."""

    name, option = "mlflow", "--mlflow-port"

    def answers(self) -> bool:
        return http_ok(f"http://{self.address}/health")

    def launch(self) -> None:
        host = self.layout.host
        args = [str(BIN / "mlflow"), "server", "--backend-store-uri", Postgres(self.layout).uri(),
                "--artifacts-destination", str(self.layout.dir / "mlartifacts"), "--serve-artifacts",
                "--host", host, "--port", str(self.port), "--workers", "1"]
        if host not in ("127.0.0.1", "localhost"):
            args += ["--allowed-hosts", f"{host},{host}:{self.port},localhost,localhost:{self.port}"]
        self.spawn(args)


class Prefect(Service):
    """The Prefect server (scheduler included), its SQLite database under its own PREFECT_HOME."""

    name, option = "prefect", "--prefect-port"

    def answers(self) -> bool:
        return http_ok(f"http://{self.address}/api/health")

    def launch(self) -> None:
        self.spawn([str(BIN / "prefect"), "server", "start", "--host", self.layout.host, "--port", str(self.port)],
                   PREFECT_HOME=str(self.folder / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_API_URL=None)


class Ray(Service):
    """A Ray cluster of two nodes on this machine, one CPU each: the head, and a worker on other
    ports in the same temp dir. Token authentication, the token in the folder."""

    name, option = "ray", "--ray-port"
    NODES = 2

    def env(self) -> dict[str, str]:
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        keys = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")
        return {**{k: self.layout.env()[k] for k in keys}, "PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0"}

    def pids(self) -> list[int]:
        """The cluster's processes: those whose command line names its temp dir."""
        import psutil

        tmp = str(self.layout.ray_tmp)
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any(tmp in part for part in proc.info["cmdline"] or ()):
                found.append(proc.info["pid"])
        return sorted(found)

    def nodes(self) -> int:
        """How many nodes `ray status` reports alive (0 if it does not answer)."""
        result = subprocess.run([str(BIN / "ray"), "status", "--address", self.address], capture_output=True,
                                text=True, env=service_env(**self.env()), stdin=subprocess.DEVNULL, timeout=120)
        if result.returncode:
            return 0
        active = result.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return sum(1 for line in active.splitlines() if " node_" in line)

    def answers(self) -> bool:
        return not port_free(self.layout.host, self.port) and self.nodes() >= self.NODES

    def detail(self) -> str:
        return f"{self.nodes()} of {self.NODES} nodes alive" if self.pids() else ""

    def launch(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        token = self.folder / "auth_token"
        if not token.is_file():
            token.write_text(secrets.token_hex(32))
            token.chmod(0o600)
        tmp, ports, host = self.layout.ray_tmp, self.layout.ray_ports(), self.layout.host
        link = self.folder / "tmp"
        if not link.is_symlink():
            link.symlink_to(tmp)
        common = ["--node-ip-address", host, "--num-cpus", "1", "--temp-dir", str(tmp), "--disable-usage-stats"]
        with open(self.log, "ab") as log:
            for node, extra in (("head", ["--head", "--port", str(self.port), "--include-dashboard", "false",
                                          "--dashboard-port", str(ports["dashboard"])]),
                                ("worker", ["--address", self.address])):
                args = [str(BIN / "ray"), "start", *common, *extra,
                        "--node-manager-port", str(ports[f"{node}_node_manager"]),
                        "--object-manager-port", str(ports[f"{node}_object_manager"]),
                        "--dashboard-agent-listen-port", str(ports[f"{node}_agent"])]
                if subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env=service_env(**self.env())).returncode:
                    raise ServiceError(f"ray: `ray start` of the {node} node failed; see {self.log}")

    def stop(self) -> None:
        terminate(self.pids())


SERVICES = (Postgres, MLflow, Prefect, Ray)  # start order; stopped in reverse


def services(layout: Layout) -> list[Service]:
    return [kind(layout) for kind in SERVICES]


def up(layout: Layout, say=print) -> dict[str, str]:
    """Start what is not up yet (PostgreSQL first, the rest side by side), wait until each
    answers, and write env.sh. A port taken by another process is refused before anything starts."""
    layout.dir.mkdir(parents=True, exist_ok=True)
    running = {service.name: service.is_up() for service in services(layout)}
    for service in services(layout):
        if not running[service.name] and not service.pids():
            ports = [service.port] + (list(layout.ray_ports().values()) if service.name == "ray" else [])
            for port in ports:
                require_port(layout.host, port, service.option if port == service.port else "--ray-port")
    layout.save()
    postgres, *rest = services(layout)
    for group in ([postgres], rest):
        started = [s for s in group if not running[s.name]]
        for service in group:
            if running[service.name]:
                say(f"{service.name}: already up on {service.address}")
            elif not service.pids():
                service.launch()
        for service in started:
            service.wait()
            say(f"{service.name}: up on {service.address}")
    env = layout.env()
    (layout.dir / "env.sh").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    return env


def down(layout: Layout, say=print) -> None:
    """Stop every service in reverse order of start."""
    for service in reversed(services(layout)):
        was_up = bool(service.pids())
        service.stop()
        say(f"{service.name}: {'stopped' if was_up else 'was not running'}")


def status(layout: Layout) -> list[dict]:
    """One row per service: name, address, pids, up, and a detail (Ray: its nodes)."""
    return [{"service": s.name, "address": s.address, "pids": s.pids(), "up": s.is_up(), "detail": s.detail()}
            for s in services(layout)]
