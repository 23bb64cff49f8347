"""Claims: two auditors never audit the same model version at once.

A claim is an object whose *creation* is atomic in the store: exactly one of
several concurrent creators of the same name succeeds.

* Database-backed stores (``sqlite``, ``postgresql``, ``mysql``, ``mssql``)
  and tracking servers (``http(s)``, ``databricks``): a registered model named
  ``compbias-claim-...``.  ``create_registered_model`` is an INSERT guarded by
  the table's primary key, so a second creator fails with
  ``RESOURCE_ALREADY_EXISTS``.  (A tracking server backed by MLflow's file
  store cannot give that guarantee; run servers on a database.)
* File stores (``file:`` URIs and plain paths): MLflow's file store checks for
  an existing registered model and then creates the directory with
  ``exist_ok=True``, which is not atomic.  Claims there are files created with
  ``O_CREAT | O_EXCL`` in ``<store>/.compbias-claims``, which is atomic on
  POSIX file systems.

Expiry.  A claim carries its owner and a heartbeat time, refreshed while the
audit runs.  A claim whose heartbeat is older than the time-to-live was left by
a killed auditor.  It is taken over by creating the *next generation*
``<name>-g<k+1>``, which is again an atomic creation, so of two auditors that
both find the same stale claim only one takes it over.  Before writing tags an
auditor checks that no newer generation of its claims exists (it was not
presumed dead and overtaken).  After taking a claim, the auditor re-reads the
version's tags: a version audited in the meantime is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from compbias import contract as C
from compbias.platform.audit.settings import DEFAULT_TTL_SECONDS

CLAIM_PREFIX = "compbias-claim-"
OWNER = C.CLAIM_OWNER
HEARTBEAT = C.CLAIM_HEARTBEAT
TARGET = C.CLAIM_TARGET
_GEN = re.compile(r"^(?P<base>.+)-g(?P<gen>\d+)$")


def new_owner_id() -> str:
    """Return a unique id for this auditor: host, process id and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def claim_name(target: str, metrics_version: str) -> str:
    """Name of the claim on auditing ``target`` (``NAME/VERSION``) with a metrics version.

    Parameters
    ----------
    target : str
    metrics_version : str

    Returns
    -------
    str
        ``compbias-claim-<readable part>-<hash>``, valid as a registered model
        name and a file name.
    """
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", target)[:80]
    digest = hashlib.sha1(f"{target}\x00{metrics_version}".encode()).hexdigest()[:12]
    return f"{CLAIM_PREFIX}{readable}-{digest}"


class RegistryClaimBackend:
    """Claims as registered models (atomic through the database's unique key).

    Parameters
    ----------
    client : MlflowClient
    """

    def __init__(self, client: MlflowClient):
        self.client = client

    def create(self, name: str, tags: dict[str, str]) -> bool:
        """Create the claim ``name``; False when it exists already."""
        try:
            self.client.create_registered_model(
                name, tags=tags, description="compbias audit claim; deleted when the audit finishes"
            )
            return True
        except MlflowException as exc:
            if exc.error_code == ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                return False
            raise

    def list(self) -> dict[str, dict[str, str]]:
        """Every claim in the store, name -> tags."""
        out: dict[str, dict[str, str]] = {}
        token = None
        while True:
            page = self.client.search_registered_models(
                filter_string=f"name LIKE '{CLAIM_PREFIX}%'", max_results=1000, page_token=token
            )
            for rm in page:
                if rm.name.startswith(CLAIM_PREFIX):
                    out[rm.name] = dict(rm.tags or {})
            token = getattr(page, "token", None)
            if not token:
                return out

    def touch(self, name: str, heartbeat: str) -> None:
        """Refresh the heartbeat of a held claim."""
        self.client.set_registered_model_tag(name, HEARTBEAT, heartbeat)

    def delete(self, name: str) -> None:
        """Delete a claim; a claim already gone is fine."""
        try:
            self.client.delete_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise


class FileClaimBackend:
    """Claims as files created with ``O_EXCL`` (for MLflow file stores).

    Parameters
    ----------
    root : path-like
        Directory holding the claim files.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def create(self, name: str, tags: dict[str, str]) -> bool:
        """Create the claim file; False when it exists already."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.root / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(tags, fh)
        return True

    def list(self) -> dict[str, dict[str, str]]:
        """Every claim file, name -> tags (a file being written reads as fresh)."""
        if not self.root.is_dir():
            return {}
        out = {}
        for p in self.root.iterdir():
            if not p.name.startswith(CLAIM_PREFIX) or ".tmp" in p.name:
                continue
            try:
                out[p.name] = json.loads(p.read_text() or "{}")
            except (OSError, ValueError):
                out[p.name] = {HEARTBEAT: str(time.time())}
        return out

    def touch(self, name: str, heartbeat: str) -> None:
        """Refresh the heartbeat (atomic replace of the file's content)."""
        path = self.root / name
        try:
            tags = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            return
        tags[HEARTBEAT] = heartbeat
        tmp = self.root / f"{name}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(tags))
        os.replace(tmp, path)

    def delete(self, name: str) -> None:
        """Remove a claim file; one already gone is fine."""
        try:
            os.unlink(self.root / name)
        except FileNotFoundError:
            pass


def backend_for(client: MlflowClient) -> RegistryClaimBackend | FileClaimBackend:
    """Choose the claim backend that is atomic for the client's registry store.

    Parameters
    ----------
    client : MlflowClient

    Returns
    -------
    RegistryClaimBackend or FileClaimBackend
    """
    uri = str(client._registry_uri or client.tracking_uri)
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        path = url2pathname(parsed.path) if parsed.scheme == "file" else uri
        return FileClaimBackend(Path(path) / ".compbias-claims")
    return RegistryClaimBackend(client)


@dataclass
class Claim:
    """A held claim on auditing one version."""

    target: str
    base: str
    generation: int

    @property
    def name(self) -> str:
        """The claim object's name in the store."""
        return f"{self.base}-g{self.generation}"


class ClaimManager:
    """Acquire, refresh and release claims on versions.

    Parameters
    ----------
    backend : RegistryClaimBackend or FileClaimBackend
    metrics_version : str
    owner : str, optional
        This auditor's id (default :func:`new_owner_id`).
    ttl : float
        Seconds after the last heartbeat at which a claim counts as left by a
        killed auditor.
    clock : callable
        Returns the time in seconds (tests pass a fake one).
    """

    def __init__(self, backend, metrics_version: str, *, owner: str | None = None, ttl: float = DEFAULT_TTL_SECONDS, clock=time.time):
        if ttl <= 0:
            raise ValueError(f"claim ttl must be positive seconds, got {ttl}")
        self.backend = backend
        self.metrics_version = metrics_version
        self.owner = owner or new_owner_id()
        self.ttl = float(ttl)
        self.clock = clock
        self.held: dict[str, Claim] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _generations(self, snapshot: dict[str, dict[str, str]], base: str) -> dict[int, dict[str, str]]:
        out = {}
        for name, tags in snapshot.items():
            m = _GEN.match(name)
            if m and m.group("base") == base:
                out[int(m.group("gen"))] = tags
        return out

    def _fresh(self, tags: dict[str, str]) -> bool:
        try:
            beat = float(tags.get(HEARTBEAT, "0"))
        except ValueError:
            beat = 0.0
        return self.clock() - beat < self.ttl

    def acquire(self, targets: list[str]) -> list[str]:
        """Try to claim each target; return the ones claimed, in order.

        Parameters
        ----------
        targets : list of str
            ``NAME/VERSION`` of the versions to audit.

        Returns
        -------
        list of str
            Targets now held by this auditor.  A target held by a live auditor
            is skipped; one held by a dead auditor (stale heartbeat) is taken
            over through the next generation.
        """
        snapshot = self.backend.list()
        got = []
        for target in targets:
            base = claim_name(target, self.metrics_version)
            gens = self._generations(snapshot, base)
            if gens:
                top = max(gens)
                if self._fresh(gens[top]):
                    continue
                gen = top + 1
            else:
                gen = 0
            claim = Claim(target, base, gen)
            tags = {OWNER: self.owner, HEARTBEAT: repr(self.clock()), TARGET: target}
            if self.backend.create(claim.name, tags):
                with self._lock:
                    self.held[target] = claim
                for old in gens:  # stale generations of a dead auditor
                    self.backend.delete(f"{base}-g{old}")
                got.append(target)
        return got

    def still_held(self, targets: list[str] | None = None) -> list[str]:
        """Return the held targets that no other auditor has taken over.

        Parameters
        ----------
        targets : list of str, optional
            Default: every held target.

        Returns
        -------
        list of str
            Targets whose claim has no newer generation in the store.
        """
        snapshot = self.backend.list()
        out = []
        for target in targets if targets is not None else list(self.held):
            claim = self.held.get(target)
            if claim is None:
                continue
            gens = self._generations(snapshot, claim.base)
            if claim.generation in gens and max(gens) == claim.generation:
                out.append(target)
        return out

    def heartbeat(self) -> None:
        """Refresh the heartbeat of every held claim."""
        now = repr(self.clock())
        with self._lock:
            claims = list(self.held.values())
        for claim in claims:
            try:
                self.backend.touch(claim.name, now)
            except Exception:  # a failed heartbeat only shortens the claim's life
                pass

    def release(self, targets: list[str] | None = None) -> None:
        """Delete the claims on ``targets`` (default: all held)."""
        with self._lock:
            keys = list(self.held) if targets is None else [t for t in targets if t in self.held]
            claims = [self.held.pop(k) for k in keys]
        for claim in claims:
            self.backend.delete(claim.name)

    def start_heartbeat(self) -> None:
        """Refresh held claims in a background thread every ``ttl / 4`` seconds."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop():
            while not self._stop.wait(self.ttl / 4):
                self.heartbeat()

        self._thread = threading.Thread(target=loop, name="compbias-claim-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        """Stop the background heartbeat."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = None

    def __enter__(self) -> "ClaimManager":
        self.start_heartbeat()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_heartbeat()
        self.release()
