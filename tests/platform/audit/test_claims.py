"""Claims: atomic in each backend, exclusive between auditors, taken over after expiry."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from compbias.platform.audit.claims import (
    ClaimManager,
    FileClaimBackend,
    RegistryClaimBackend,
    backend_for,
    claim_name,
)


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture(params=["registry", "file"])
def backend(request, client, tmp_path):
    if request.param == "registry":
        return RegistryClaimBackend(client)
    return FileClaimBackend(tmp_path / "claims")


def test_backend_choice(client, tmp_path):
    assert isinstance(backend_for(client), RegistryClaimBackend)
    for uri in (str(tmp_path / "mlruns"), f"file://{tmp_path}/mlruns"):
        fake = SimpleNamespace(tracking_uri=uri, _registry_uri=uri)  # the file store itself needs an opt-in to start
        b = backend_for(fake)
        assert isinstance(b, FileClaimBackend) and b.root == tmp_path / "mlruns" / ".compbias-claims"
    fake = SimpleNamespace(tracking_uri="http://tracking:5000", _registry_uri="http://tracking:5000")
    assert isinstance(backend_for(fake), RegistryClaimBackend)


def test_create_is_exclusive(backend):
    name = claim_name("m/1", "1") + "-g0"
    assert backend.create(name, {"x": "1"})
    assert not backend.create(name, {"x": "2"})
    assert backend.list()[name]["x"] == "1"
    backend.delete(name)
    backend.delete(name)  # already gone is fine
    assert name not in backend.list()


def test_concurrent_creators_exactly_one_wins(backend):
    name = claim_name("m/7", "1") + "-g0"
    n = 6
    barrier = threading.Barrier(n)
    wins = []

    def attempt(i):
        barrier.wait()
        if backend.create(name, {"owner": str(i)}):
            wins.append(i)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1


def test_two_auditors_never_hold_the_same_version(backend):
    clock = Clock()
    a = ClaimManager(backend, "1", owner="a", ttl=60, clock=clock)
    b = ClaimManager(backend, "1", owner="b", ttl=60, clock=clock)
    assert a.acquire(["m/1", "m/2"]) == ["m/1", "m/2"]
    assert b.acquire(["m/1", "m/2", "m/3"]) == ["m/3"]
    a.release(["m/1"])
    assert b.acquire(["m/1"]) == ["m/1"]
    assert a.still_held() == ["m/2"]


def test_stale_claim_is_taken_over_once_and_the_old_holder_notices(backend):
    clock = Clock()
    dead = ClaimManager(backend, "1", owner="dead", ttl=60, clock=clock)
    assert dead.acquire(["m/1"]) == ["m/1"]
    clock.t += 30
    b = ClaimManager(backend, "1", owner="b", ttl=60, clock=clock)
    assert b.acquire(["m/1"]) == []  # still fresh
    clock.t += 61
    c = ClaimManager(backend, "1", owner="c", ttl=60, clock=clock)
    assert b.acquire(["m/1"]) == ["m/1"]  # expired: next generation
    assert c.acquire(["m/1"]) == []  # b's new claim is fresh
    assert dead.still_held() == []  # the presumed-dead auditor must not write tags
    assert b.still_held() == ["m/1"]
    b.release()
    assert backend.list() == {}


def test_heartbeat_keeps_a_claim_alive(backend):
    clock = Clock()
    a = ClaimManager(backend, "1", owner="a", ttl=60, clock=clock)
    a.acquire(["m/1"])
    clock.t += 50
    a.heartbeat()
    clock.t += 50
    b = ClaimManager(backend, "1", owner="b", ttl=60, clock=clock)
    assert b.acquire(["m/1"]) == []


def test_claims_are_per_metrics_version(backend):
    a = ClaimManager(backend, "1", owner="a", ttl=60)
    b = ClaimManager(backend, "2", owner="b", ttl=60)
    assert a.acquire(["m/1"]) == ["m/1"]
    assert b.acquire(["m/1"]) == ["m/1"]


def test_bad_ttl():
    with pytest.raises(ValueError, match="ttl"):
        ClaimManager(FileClaimBackend("/nonexistent"), "1", ttl=0)
