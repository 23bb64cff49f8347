"""A throw-away PostgreSQL cluster on loopback (the backend of the deployment's tracking server)."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from devtools.processes import LOOPBACK, Service, ServiceError, free_port, short_tempdir, spawn, wait_for

__all__ = ["PostgresServer", "start_postgres"]


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
