"""Ray clusters of ``ray start`` nodes on loopback, started as a user would, stopped by their process groups."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devtools.processes import LOOPBACK, Service, ServiceError, VENV_BIN, free_port, short_tempdir, spawn, stop_all, wait_for

__all__ = ["RayCluster", "start_ray_cluster"]


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
