"""Audit on a schedule: :func:`watch` repeats :func:`~compbias.platform.audit.service.run_audit`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from mlflow.tracking import MlflowClient

from compbias.platform.audit.selection import Selection
from compbias.platform.audit.service import AuditResult, run_audit
from compbias.platform.audit.settings import AuditOptions, parse_interval  # noqa: F401  (re-exported)
from compbias.platform.tracking import configure_tracking

log = logging.getLogger("compbias.audit")


def watch(
    client: MlflowClient | None = None,
    options: AuditOptions | None = None,
    *,
    interval: float = 600.0,
    max_passes: int | None = None,
    on_pass: Callable[[list[AuditResult]], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    progress: Callable[[str], None] | None = None,
) -> int:
    """Audit new versions every ``interval`` seconds until stopped.

    Parameters
    ----------
    client : MlflowClient, optional
    options : AuditOptions, optional
    interval : float
        Seconds between the starts of two passes.
    max_passes : int, optional
        Stop after this many passes (default: run until interrupted).
    on_pass : callable, optional
        Called with each pass's results.
    sleep : callable
        Waits (tests pass a fake one).
    progress : callable, optional

    Returns
    -------
    int
        Number of audit runs logged.
    """
    client = client if client is not None else configure_tracking()  # explicit: no process URI is set
    say = progress or (lambda msg: log.info(msg))
    n_runs = passes = 0
    while max_passes is None or passes < max_passes:
        start = time.monotonic()
        try:
            results = run_audit(client, Selection(), options, progress=progress)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a failing pass must not end the watch
            log.exception("audit pass failed")
            say(f"audit pass failed: {type(exc).__name__}: {exc}; retrying in {interval:.0f}s")
            results = []
        n_runs += len(results)
        passes += 1
        if on_pass is not None:
            on_pass(results)
        if max_passes is not None and passes >= max_passes:
            break
        sleep(max(0.0, interval - (time.monotonic() - start)))
    return n_runs
