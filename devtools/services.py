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

Where each part lives (every name is importable from here):

======================  =======================================================
:mod:`.processes`       ``Service``, ``spawn``, ``wait_for``, ``http_status``,
                        ports and short temporary directories
:mod:`.network`         ``loopback_only_network``
:mod:`.postgres`        ``start_postgres``
:mod:`.mlflow_servers`  ``start_mlflow_server``, ``start_deployment_mlflow_server``,
                        ``BasicAuth``
:mod:`.ray_clusters`    ``start_ray_cluster``
======================  =======================================================
"""

from __future__ import annotations

from devtools.processes import (  # noqa: F401
    VENV_BIN, LOOPBACK, ServiceError, free_port, short_tempdir, Service, stop_all, spawn, wait_for, http_status,
    running, iter_files,
)
from devtools.network import (  # noqa: F401
    loopback_only_network,
)
from devtools.postgres import (  # noqa: F401
    PostgresServer, start_postgres,
)
from devtools.mlflow_servers import (  # noqa: F401
    MLFLOW_SERVER_ENV, BasicAuth, MlflowServer, start_mlflow_server, DOCKER_DIR, start_deployment_mlflow_server,
)
from devtools.ray_clusters import (  # noqa: F401
    RayCluster, start_ray_cluster,
)
