"""MLflow tracking servers on loopback: a plain one (SQLite), and the deployment's (``docker/mlflow-server.sh``)."""

from __future__ import annotations

import json
import os
import secrets
import textwrap
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path

from devtools.processes import LOOPBACK, Service, ServiceError, VENV_BIN, free_port, http_status, spawn, wait_for
from devtools.postgres import PostgresServer

__all__ = [
    "MLFLOW_SERVER_ENV", "BasicAuth", "MlflowServer", "start_mlflow_server", "DOCKER_DIR",
    "start_deployment_mlflow_server",
]


#: Environment given to every MLflow server started here: the GenAI job runner
#: (a dozen huey consumer processes) is of no use to compbias and would eat the
#: two cores the test suite has.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


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
