"""Child processes in their own session: start, wait for, probe over HTTP and stop them, never anyone else's."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "VENV_BIN", "LOOPBACK", "ServiceError", "free_port", "short_tempdir", "Service", "stop_all", "spawn",
    "wait_for", "http_status", "running", "iter_files",
]


VENV_BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"


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
