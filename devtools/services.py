"""Real services on loopback for the scale-out tests and benchmarks: MLflow servers, PostgreSQL, Ray.

Every service is a child process started in its own session (so its process
group id is its pid), bound to 127.0.0.1 on a free port, with its state in a
fresh temporary directory. :meth:`Service.stop` signals that process group and
nothing else, so a test never touches a server or a Ray cluster that someone
else started on the same machine (no ``ray stop``, no ``pkill``).

The helpers are plain functions usable outside pytest as well::

    from devtools.services import start_mlflow_server
    server = start_mlflow_server(Path("/tmp/x"))
    ...
    server.stop()

The pytest fixtures built on them are in ``tests/e2e/test_scaleout.py``, and
``benchmarks/scaleout.py`` uses the same helpers. When the caller may create
one (root), :func:`loopback_only_network` puts everything in a network
namespace that has only the loopback interface.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"

#: Environment given to every MLflow server started here: the GenAI job runner
#: (a dozen huey consumer processes) is of no use to compbias and would eat the
#: two cores the test suite has.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class ServiceError(RuntimeError):
    """A service did not start, or did not answer, in time; the message holds its log tail."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now.

    Returns
    -------
    int
        A port number the kernel just handed out for an ephemeral bind. Another
        process could take it before the caller binds it; the services started
        here fail loudly (and their log says so) if that happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def short_tempdir(prefix: str) -> Path:
    """Create a fresh directory directly under the system temp dir.

    Ray and PostgreSQL put Unix sockets in their state directories, and a socket
    path may not exceed 107 bytes, which pytest's ``tmp_path`` easily does.

    Parameters
    ----------
    prefix : str
        Start of the directory name.

    Returns
    -------
    pathlib.Path
        The new, empty directory (mode 0700, owned by the caller).
    """
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@dataclass
class Service:
    """One process started by these helpers, and everything it forked.

    Attributes
    ----------
    name : str
        Human-readable name used in messages.
    process : subprocess.Popen
        The child, started with ``start_new_session=True``: its pid is the id of
        the process group that its own children inherit.
    log_path : pathlib.Path
        File that receives the child's stdout and stderr.
    stop_signal : int
        Signal sent first on :meth:`stop` (SIGTERM unless the program wants
        another one for a fast clean shutdown, e.g. SIGINT for PostgreSQL).
    """

    name: str
    process: subprocess.Popen
    log_path: Path
    stop_signal: int = signal.SIGTERM

    @property
    def pgid(self) -> int:
        """Process group id of the service (equal to its pid)."""
        return self.process.pid

    def alive(self) -> bool:
        """Return True while the main process of the service runs."""
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of the service's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def group_members(self) -> list[int]:
        """Return the pids of all live processes in the service's process group."""
        members = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # fields after the parenthesised command: state ppid pgrp ...
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == self.pgid:
                members.append(int(entry.name))
        return members

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the service and every process of its group, by their own ids.

        Sends :attr:`stop_signal` to the process group, waits up to ``timeout``
        seconds for the group to empty, then sends SIGKILL to what is left.

        Parameters
        ----------
        timeout : float
            Seconds to wait for a clean shutdown before killing.
        """
        stop_all([self], timeout=timeout)

    def finished(self) -> bool:
        """Return True once the main process has exited and its group is empty."""
        self.process.poll()
        return self.process.returncode is not None and not self.group_members()


def stop_all(services: list[Service], timeout: float = 20.0) -> None:
    """Signal several services at once, wait for them together, then kill what is left.

    Parameters
    ----------
    services : list of Service
        Services to stop; each is signalled through its own process group only.
    timeout : float
        Seconds to wait for clean shutdowns before SIGKILL.
    """
    for service in services:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.pgid, service.stop_signal)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(s.finished() for s in services):
        time.sleep(0.2)
    for service in services:
        if not service.finished():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                service.process.wait(timeout=10)


def spawn(
    name: str,
    argv: list[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
    stop_signal: int = signal.SIGTERM,
) -> Service:
    """Start ``argv`` in a new session with its output in ``log_path``.

    Parameters
    ----------
    name : str
        Name used in messages.
    argv : list of str
        Program and arguments.
    log_path : pathlib.Path
        Where stdout and stderr go (appended).
    env : mapping, optional
        Complete environment of the child (default: a copy of ours).
    cwd : pathlib.Path, optional
        Working directory of the child.
    user : str, optional
        Run the child as this user (only when we are root).
    stop_signal : int
        First signal sent by :meth:`Service.stop`.

    Returns
    -------
    Service
        The running service.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ if env is None else env),
            cwd=cwd,
            start_new_session=True,
            user=user,
        )
    return Service(name=name, process=process, log_path=log_path, stop_signal=stop_signal)


def wait_for(
    ready: Callable[[], bool], service: Service, what: str, timeout: float
) -> None:
    """Poll ``ready()`` until it is true; fail with the service's log if it dies or times out.

    Parameters
    ----------
    ready : callable
        Returns True once the service answers.
    service : Service
        The service being waited for.
    what : str
        What is being waited for, for the error message.
    timeout : float
        Seconds before giving up.

    Raises
    ------
    ServiceError
        The service exited, or ``ready()`` stayed false for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        if not service.alive():
            raise ServiceError(
                f"{service.name} exited with code {service.process.returncode} while waiting "
                f"for {what}; log {service.log_path}:\n{service.log_tail()}"
            )
        if time.monotonic() > deadline:
            service.stop()
            raise ServiceError(
                f"{service.name}: no {what} after {timeout:.0f} s; log {service.log_path}:\n"
                f"{service.log_tail()}"
            )
        time.sleep(0.3)


def http_status(url: str, *, auth: tuple[str, str] | None = None, timeout: float = 2.0) -> int:
    """Return the HTTP status of a GET of ``url`` (0 when nothing answers).

    Parameters
    ----------
    url : str
        Address to fetch.
    auth : (str, str), optional
        Basic-auth username and password.
    timeout : float
        Socket timeout in seconds.

    Returns
    -------
    int
        The status code, or 0 if the connection failed.
    """
    request = urllib.request.Request(url)
    if auth is not None:
        token = b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0


# --------------------------------------------------------------------------- network


_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def _bring_loopback_up() -> None:
    """Set the ``lo`` interface of the current network namespace up (like ``ip link set lo up``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14s", b"lo", 0, bytes(14))
        flags = struct.unpack("16sH", fcntl.ioctl(sock, _SIOCGIFFLAGS, request)[:18])[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | _IFF_UP, bytes(14)))


@contextlib.contextmanager
def loopback_only_network() -> Iterator[bool]:
    """Run the block (and every process it starts) in a new network namespace holding only ``lo``.

    Ray replaces ``127.0.0.1`` in a driver's cluster address by the machine's
    "node IP", the address of its default route's interface, so on a machine
    with a network interface a driver would talk to the cluster through that
    interface even though every node was started with
    ``--node-ip-address=127.0.0.1``. In a namespace whose only interface is
    the loopback, Ray finds no such address and keeps to 127.0.0.1, and
    nothing started inside can reach any other host.

    The namespace belongs to the calling thread (pytest's main thread) and is
    inherited by the processes it starts; on exit the thread returns to its
    original namespace. Processes started inside must be stopped before the
    block ends, since nothing outside can reach them.

    Yields
    ------
    bool
        True when the namespace was made; False when the process may not make
        one (not root, or no ``CAP_SYS_ADMIN``): the block then runs in the
        current network, where Ray's traffic may use the machine's own
        interface address.
    """
    try:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    except OSError:
        yield False
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        os.close(original)
        if code in (errno.EPERM, errno.EINVAL, errno.ENOSYS):
            yield False
            return
        raise OSError(code, f"unshare(CLONE_NEWNET): {os.strerror(code)}")
    try:
        _bring_loopback_up()
        yield True
    finally:
        if libc.setns(original, _CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"could not return to the original network namespace: {os.strerror(code)}")
        os.close(original)


# --------------------------------------------------------------------------- PostgreSQL


def _postgres_bindir() -> Path:
    """Directory of Debian's PostgreSQL server programs (initdb, postgres)."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), reverse=True)
    if candidates:
        return candidates[0].parent
    found = shutil.which("postgres")
    if found:
        return Path(found).resolve().parent
    raise ServiceError(
        "PostgreSQL server programs not found (looked in /usr/lib/postgresql/*/bin and on "
        "PATH); install Debian's package: apt-get install -y postgresql"
    )


@dataclass
class PostgresServer:
    """A throw-away PostgreSQL cluster on 127.0.0.1.

    Attributes
    ----------
    service : Service
        The postmaster.
    port : int
        TCP port on 127.0.0.1.
    user, password, database : str
        Credentials and database made for MLflow.
    data_dir : pathlib.Path
        The cluster's directory (removed by :meth:`stop`).
    """

    service: Service
    port: int
    user: str
    password: str
    database: str
    data_dir: Path

    @property
    def uri(self) -> str:
        """SQLAlchemy URI of the database (for ``mlflow server --backend-store-uri``).

        The driver is named (``+psycopg2``): SQLAlchemy 2.1 maps a bare
        ``postgresql://`` to psycopg 3, 2.0 to psycopg2.
        """
        return (
            f"postgresql+psycopg2://{self.user}:{self.password}@{LOOPBACK}:{self.port}/{self.database}"
        )

    def stop(self) -> None:
        """Fast shutdown of the postmaster, then removal of its data directory."""
        self.service.stop()
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)


def start_postgres(*, database: str = "mlflow", timeout: float = 60.0) -> PostgresServer:
    """Initialise and start a PostgreSQL cluster on a free loopback port.

    PostgreSQL refuses to run as root; when we are root the cluster belongs to
    Debian's ``postgres`` system user (created by the ``postgresql`` package).
    Password authentication (scram-sha-256) is required on TCP.

    Parameters
    ----------
    database : str
        Name of the database created for MLflow.
    timeout : float
        Seconds to wait for the server to accept connections.

    Returns
    -------
    PostgresServer
        The running server; call :meth:`PostgresServer.stop`.

    Raises
    ------
    ServiceError
        PostgreSQL is not installed, or did not start.
    """
    bindir = _postgres_bindir()
    run_as = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError as err:
            raise ServiceError(
                "running as root and there is no 'postgres' user to own the test cluster; "
                "install Debian's package (apt-get install -y postgresql) or run as a normal user"
            ) from err
        run_as = "postgres"
    base = short_tempdir("compbias-pg-")
    data_dir = base / "data"
    password = secrets.token_urlsafe(16)
    pwfile = base / "pwfile"
    pwfile.write_text(password + "\n")
    if run_as is not None:
        shutil.chown(base, run_as)
        shutil.chown(pwfile, run_as)
    user = "compbias"
    init = subprocess.run(
        [
            str(bindir / "initdb"), "-D", str(data_dir), "-U", user, f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync",
        ],
        capture_output=True, text=True, user=run_as, timeout=120,
    )
    pwfile.unlink()
    if init.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        raise ServiceError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
    port = free_port()
    service = spawn(
        "postgres",
        [
            str(bindir / "postgres"), "-D", str(data_dir), "-p", str(port),
            "-c", f"listen_addresses={LOOPBACK}", "-c", f"unix_socket_directories={base}",
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
        ],
        base / "postgres.log",
        user=run_as,
        stop_signal=signal.SIGINT,  # "fast" shutdown: roll back clients, exit
    )
    server = PostgresServer(service, port, user, password, database, data_dir)

    def accepts() -> bool:
        probe = subprocess.run(
            [str(bindir.parent / "bin" / "pg_isready"), "-h", LOOPBACK, "-p", str(port)],
            capture_output=True,
        )
        return probe.returncode == 0

    wait_for(accepts, service, "connections", timeout)
    created = subprocess.run(
        [str(bindir / "createdb"), "-h", str(base), "-p", str(port), "-U", user, database],
        capture_output=True, text=True, user=run_as,
    )
    if created.returncode != 0:
        server.stop()
        raise ServiceError(f"createdb {database} failed: {created.stderr}")
    return server


# --------------------------------------------------------------------------- MLflow


@dataclass
class BasicAuth:
    """Settings of MLflow's basic-auth app for one server.

    Attributes
    ----------
    admin_username, admin_password : str
        The admin account created on first start.
    default_permission : str
        Permission every user has on resources others created (``READ`` here).
    auth_cache_ttl_seconds : int
        How long a checked password stays valid in the server's cache. MLflow's
        default (0) re-hashes the password (PBKDF2) on every request, which
        makes logging a model through the server several times slower; a
        password change then takes up to this long to reach every worker.
    """

    admin_username: str = "admin"
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    default_permission: str = "READ"
    auth_cache_ttl_seconds: int = 60


@dataclass
class MlflowServer:
    """A running ``mlflow server`` on 127.0.0.1.

    Attributes
    ----------
    service : Service
        The server process (uvicorn and its workers are in its group).
    url : str
        Tracking URI, e.g. ``http://127.0.0.1:5123``.
    backend_store_uri : str
        Where runs and the registry are kept.
    artifacts_destination : pathlib.Path
        Directory the server stores proxied artifacts in.
    auth : BasicAuth or None
        Basic-auth settings when the server runs ``--app-name basic-auth``.
    """

    service: Service
    url: str
    backend_store_uri: str
    artifacts_destination: Path
    auth: BasicAuth | None = None

    def stop(self) -> None:
        """Stop the server process group."""
        self.service.stop()

    def create_user(self, username: str, password: str) -> None:
        """Create a (non-admin) user through the basic-auth REST API.

        Parameters
        ----------
        username, password : str
            The new account.

        Raises
        ------
        ServiceError
            The server has no basic auth, or refused the request.
        """
        if self.auth is None:
            raise ServiceError("this server runs without basic auth; it has no users")
        body = json.dumps({"username": username, "password": password}).encode()
        request = urllib.request.Request(
            f"{self.url}/api/2.0/mlflow/users/create", data=body, method="POST",
            headers={"Content-Type": "application/json"},
        )
        token = b64encode(
            f"{self.auth.admin_username}:{self.auth.admin_password}".encode()
        ).decode()
        request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()
        except urllib.error.HTTPError as err:
            raise ServiceError(
                f"creating MLflow user {username!r} failed: {err.code} {err.read()[:300]!r}"
            ) from err


def start_mlflow_server(
    workdir: Path,
    *,
    backend_store_uri: str | None = None,
    auth: BasicAuth | None = None,
    timeout: float = 120.0,
) -> MlflowServer:
    """Start ``mlflow server`` on a free loopback port, artifacts proxied to ``workdir``.

    Parameters
    ----------
    workdir : pathlib.Path
        Directory for the server's log, its SQLite files (unless another backend
        is given) and ``artifacts/`` (the ``--artifacts-destination``). It is
        also the server's working directory, so a misconfigured server that
        writes ``./mlruns`` or ``./mlartifacts`` does so here, visibly.
    backend_store_uri : str, optional
        Backend store (default: ``sqlite:///<workdir>/mlflow.db``).
    auth : BasicAuth, optional
        Run MLflow's basic-auth app with these settings (its user database is
        ``<workdir>/basic_auth.db``).
    timeout : float
        Seconds to wait for ``/health`` to answer.

    Returns
    -------
    MlflowServer
        The running server; call :meth:`MlflowServer.stop`.

    Raises
    ------
    ServiceError
        The server exited or did not answer in time (the message has its log).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    artifacts = workdir / "artifacts"
    artifacts.mkdir(exist_ok=True)
    backend = backend_store_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    port = free_port()
    env = dict(os.environ)
    for key in [k for k in env if k.startswith("MLFLOW_TRACKING_")]:
        del env[key]
    env.update(MLFLOW_SERVER_ENV)
    argv = [
        str(VENV_BIN / "mlflow"), "server",
        "--host", LOOPBACK, "--port", str(port), "--workers", "1",
        "--backend-store-uri", backend,
        "--artifacts-destination", str(artifacts),
    ]
    if auth is not None:
        ini = workdir / "basic_auth.ini"
        ini.write_text(
            textwrap.dedent(
                f"""\
                [mlflow]
                default_permission = {auth.default_permission}
                database_uri = sqlite:///{workdir / 'basic_auth.db'}
                admin_username = {auth.admin_username}
                authorization_function = mlflow.server.auth:authenticate_request_basic_auth
                auth_cache_ttl_seconds = {auth.auth_cache_ttl_seconds}
                """
            )
        )
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = auth.admin_password
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(16)
        argv += ["--app-name", "basic-auth"]
    service = spawn("mlflow server", argv, workdir / "server.log", env=env, cwd=workdir)
    url = f"http://{LOOPBACK}:{port}"
    wait_for(lambda: http_status(f"{url}/health") == 200, service, "/health", timeout)
    return MlflowServer(service, url, backend, artifacts, auth)


DOCKER_DIR = Path(__file__).resolve().parents[1] / "docker"


def start_deployment_mlflow_server(
    workdir: Path, postgres: PostgresServer, auth: BasicAuth, *, timeout: float = 120.0
) -> MlflowServer:
    """Start the tracking server exactly as the compose deployment does, on loopback.

    Runs ``docker/entrypoint.sh docker/mlflow-server.sh`` (the image's entry
    point and the ``mlflow`` service's command) outside a container: the
    PostgreSQL and admin passwords are handed over as ``*_FILE`` secrets, and
    the basic-auth settings are ``docker/config/basic_auth.ini`` with only its
    users database moved into ``workdir``.

    Parameters
    ----------
    workdir : pathlib.Path
        Log, secrets, users database and ``artifacts/`` go here.
    postgres : PostgresServer
        The backend database.
    auth : BasicAuth
        Admin credentials (the other settings come from the deployment's ini).
    timeout : float
        Seconds to wait for ``/health``.

    Returns
    -------
    MlflowServer
        The running server; call :meth:`MlflowServer.stop`.
    """
    import configparser

    workdir.mkdir(parents=True, exist_ok=True)
    artifacts = workdir / "artifacts"
    artifacts.mkdir(exist_ok=True)
    secrets_dir = workdir / "secrets"
    secrets_dir.mkdir(mode=0o700, exist_ok=True)
    (secrets_dir / "postgres_password").write_text(postgres.password + "\n")
    (secrets_dir / "mlflow_admin_password").write_text(auth.admin_password + "\n")
    ini = configparser.ConfigParser()
    if not ini.read(DOCKER_DIR / "config" / "basic_auth.ini"):
        raise ServiceError(f"cannot read {DOCKER_DIR / 'config' / 'basic_auth.ini'}")
    ini["mlflow"]["database_uri"] = f"sqlite:///{workdir / 'basic_auth.db'}"
    auth.admin_username = ini["mlflow"]["admin_username"]
    auth.default_permission = ini["mlflow"]["default_permission"]
    with open(workdir / "basic_auth.ini", "w") as f:
        ini.write(f)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "POSTGRES_"))}
    env.update(MLFLOW_SERVER_ENV)
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        POSTGRES_HOST=LOOPBACK, POSTGRES_PORT=str(postgres.port), POSTGRES_DB=postgres.database,
        POSTGRES_USER=postgres.user,
        POSTGRES_PASSWORD_FILE=str(secrets_dir / "postgres_password"),
        MLFLOW_AUTH_ADMIN_PASSWORD_FILE=str(secrets_dir / "mlflow_admin_password"),
        MLFLOW_AUTH_CONFIG_PATH=str(workdir / "basic_auth.ini"),
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
        MLFLOW_ARTIFACTS_DESTINATION=str(artifacts),
        MLFLOW_HOST=LOOPBACK, MLFLOW_PORT=str(port), MLFLOW_WORKERS="1",
        MLFLOW_ALLOWED_HOSTS=f"{LOOPBACK},{LOOPBACK}:{port}",
    )
    service = spawn(
        "mlflow server (docker/mlflow-server.sh)",
        [str(DOCKER_DIR / "entrypoint.sh"), str(DOCKER_DIR / "mlflow-server.sh")],
        workdir / "server.log", env=env, cwd=workdir,
    )
    url = f"http://{LOOPBACK}:{port}"
    wait_for(lambda: http_status(f"{url}/health") == 200, service, "/health", timeout)
    return MlflowServer(service, url, postgres.uri, artifacts, auth)


# --------------------------------------------------------------------------- Ray


@dataclass
class RayCluster:
    """A Ray cluster of a head and worker nodes, all on 127.0.0.1, with token auth.

    Attributes
    ----------
    address : str
        ``host:port`` of the head's GCS (what ``RAY_ADDRESS`` takes).
    token : str
        The cluster's authentication token (``RAY_AUTH_TOKEN``).
    nodes : list of Service
        The ``ray start --block`` processes, head first.
    temp_dir : pathlib.Path
        Ray's ``--temp-dir`` (sessions, logs, sockets), removed by :meth:`stop`;
        node ``i`` runs (and its workers write) in ``temp_dir / f"node{i}"``.
    node_ids : list of str
        Ray node ids of the alive nodes (hex), as ``get_node_id()`` reports them.
    """

    address: str
    token: str
    nodes: list[Service]
    temp_dir: Path
    node_ids: list[str] = field(default_factory=list)

    def leftover_pids(self) -> list[int]:
        """Pids of live processes that carry this cluster's token in their environment.

        Ray's worker processes rename themselves (``ray::IDLE``); the token in
        their environment still identifies them as ours, whatever their
        process group. Empty after :meth:`stop` when nothing escaped.
        """
        needle = f"RAY_AUTH_TOKEN={self.token}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def node_dirs(self) -> list[Path]:
        """Working directories of the nodes (head first)."""
        return [self.temp_dir / f"node{i}" for i in range(len(self.nodes))]

    def driver_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a driver joining this cluster (``RAY_ADDRESS`` and the token).

        Parameters
        ----------
        base : mapping, optional
            Environment to start from (default: ours).

        Returns
        -------
        dict
            ``base`` plus ``RAY_ADDRESS``, ``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``.
        """
        env = dict(os.environ if base is None else base)
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        env.update(
            RAY_ADDRESS=self.address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
        )
        return env

    def stop(self) -> None:
        """Stop the worker nodes, then the head, each by its process group; remove temp files.

        ``ray start --block`` and the GCS take SIGTERM slowly (tens of seconds)
        while their raylets are already gone; a node has nothing to save, so
        what is still there after a short grace gets SIGKILL.
        """
        stop_all(self.nodes, timeout=3)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


_NODE_COUNT_PROBE = textwrap.dedent(
    """\
    import json, sys, time, ray
    want, timeout = int(sys.argv[1]), float(sys.argv[2])
    ray.init(log_to_driver=False)
    deadline = time.monotonic() + timeout
    while True:
        alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        if len(alive) >= want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print(json.dumps(alive))
    """
)


def start_ray_cluster(
    *, workers: int = 1, cpus_per_node: int = 1, object_store_mb: int = 200,
    timeout: float = 120.0, ray_bin: Path | None = None, dashboard_port: int | None = None,
    env: Mapping[str, str] | None = None,
) -> RayCluster:
    """Start a head and ``workers`` worker nodes with ``ray start`` on 127.0.0.1.

    Each node is a ``ray start --block`` process in its own session; Ray's
    daemons (GCS, raylet, agents, workers) stay in that process group and stop
    with it. Every process gets the same ``RAY_AUTH_MODE=token`` and
    ``RAY_AUTH_TOKEN``. All ports are picked free, so several clusters (or
    someone else's Ray) can run side by side.

    Parameters
    ----------
    workers : int
        Worker nodes besides the head.
    cpus_per_node : int
        ``--num-cpus`` of each node (1 makes a 2-task study spread over two nodes).
    object_store_mb : int
        Object store size of each node, in MiB.
    timeout : float
        Seconds to wait for all nodes to be alive.
    ray_bin : pathlib.Path, optional
        The ``ray`` command that starts the nodes (default: this venv's); its
        Python runs the nodes' workers.
    dashboard_port : int, optional
        Start the head's dashboard (and with it Ray's job server, for ``ray
        job submit``) on 127.0.0.1 at this port; needs ``ray[default]``.
        Default: no dashboard.
    env : mapping, optional
        Environment of the nodes before the Ray settings (default: ours).

    Returns
    -------
    RayCluster
        The running cluster; call :meth:`RayCluster.stop`.

    Raises
    ------
    ServiceError
        A node exited, or the cluster did not reach its size in time.
    """
    temp_dir = short_tempdir("cbray-")
    token = secrets.token_hex(32)
    gcs_port = free_port()
    address = f"{LOOPBACK}:{gcs_port}"
    env = dict(os.environ if env is None else env)
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    env.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
        # no dashboard here, so nothing would collect the metrics
        RAY_enable_metrics_collection="0",
    )
    cluster = RayCluster(address, token, [], temp_dir)

    def node_argv(head: bool) -> list[str]:
        argv = [str(ray_bin or VENV_BIN / "ray"), "start", "--block", f"--node-ip-address={LOOPBACK}"]
        dashboard = ["--include-dashboard=false"] if dashboard_port is None else [
            "--include-dashboard=true", f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dashboard_port}"]
        argv += ["--head", f"--port={gcs_port}", f"--temp-dir={temp_dir}", *dashboard] \
            if head else [f"--address={address}"]
        argv += [
            f"--num-cpus={cpus_per_node}", "--num-gpus=0",
            f"--object-store-memory={object_store_mb * 1024 * 1024}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            "--disable-usage-stats",
        ]
        return argv

    try:
        for node_dir in (temp_dir / f"node{i}" for i in range(workers + 1)):
            node_dir.mkdir()
        head = spawn(
            "ray head", node_argv(True), temp_dir / "head.log", env=env, cwd=temp_dir / "node0"
        )
        cluster.nodes.append(head)

        def gcs_listens() -> bool:
            with socket.socket() as sock:
                sock.settimeout(1)
                return sock.connect_ex((LOOPBACK, gcs_port)) == 0

        wait_for(gcs_listens, head, "GCS port", timeout)
        for i in range(workers):
            cluster.nodes.append(
                spawn(
                    f"ray worker {i}", node_argv(False), temp_dir / f"worker{i}.log",
                    env=env, cwd=temp_dir / f"node{i + 1}",
                )
            )
        probe = subprocess.run(
            [sys.executable, "-c", _NODE_COUNT_PROBE, str(workers + 1), str(timeout)],
            env=cluster.driver_env(env), capture_output=True, text=True, timeout=timeout + 60,
        )
        lines = probe.stdout.strip().splitlines()
        cluster.node_ids = json.loads(lines[-1]) if probe.returncode == 0 and lines else []
        if len(cluster.node_ids) < workers + 1:
            logs = "\n".join(f"--- {n.name}:\n{n.log_tail(15)}" for n in cluster.nodes)
            raise ServiceError(
                f"Ray cluster has {len(cluster.node_ids)} of {workers + 1} nodes alive; probe said:\n"
                f"{probe.stderr[-2000:]}\n{logs}"
            )
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextlib.contextmanager
def running(service):
    """Context manager that stops ``service`` (anything with ``stop()``) on exit.

    Parameters
    ----------
    service : object
        A started service.

    Yields
    ------
    object
        The same service.
    """
    try:
        yield service
    finally:
        service.stop()


def iter_files(root: Path) -> Iterator[Path]:
    """Yield every regular file below ``root``, sorted.

    Parameters
    ----------
    root : pathlib.Path
        Directory to walk.

    Yields
    ------
    pathlib.Path
        Each file.
    """
    yield from sorted(p for p in root.rglob("*") if p.is_file())
