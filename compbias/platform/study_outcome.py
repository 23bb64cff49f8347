"""What a study execution reports, and the errors that stop one.

:class:`StudyOutcome` is what :func:`compbias.platform.study.run_study`
returns (models trained, resumed and failed, the time spent in MLflow) and
prints as its summary table; :class:`StudyConflictError` and
:class:`ArtifactStorageError` are the two ways a study refuses or stops on
its own (a changed study file, a full or read-only artifact location).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

__all__ = ["StudyOutcome", "StudyConflictError", "ArtifactStorageError", "EXHAUSTED_ERRNOS", "storage_exhausted"]


class ArtifactStorageError(OSError):
    """The artifact location is full or read-only: the study stops (models already logged are kept)."""


#: ``errno`` values that mean the artifact location is full or read-only.
EXHAUSTED_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def storage_exhausted(exc: BaseException) -> OSError | None:
    """The disk-full / quota / read-only ``OSError`` behind ``exc`` (following its causes), if any.

    Parameters
    ----------
    exc : BaseException
        An error raised while logging a model; its ``__cause__`` and
        ``__context__`` chain is followed.

    Returns
    -------
    OSError or None
        The first error in the chain whose ``errno`` is in :data:`EXHAUSTED_ERRNOS`.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in EXHAUSTED_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class StudyConflictError(RuntimeError):
    """The study file changed in a way that makes already-logged models stale."""


@dataclass
class StudyOutcome:
    """What one execution did.

    Attributes
    ----------
    study : str
    experiment_id, parent_run_id : str
    tracking_uri : str
    models : dict
        ``(seed, method, level) -> FinishedModel`` for every planned model now finished.
    trained : list of tuple
        Keys of the models this execution produced.
    resumed : list of tuple
        Keys found finished from an earlier execution.
    failed : dict
        Key -> error message for tasks that failed.
    interrupted, deleted_versions : list of str
        Runs marked failed and versions deleted while resuming.
    wall_seconds, tracking_seconds : float
        Total time and time spent talking to MLflow in the driver.
    nodes : set of str
        Ray node ids that ran tasks.
    """

    study: str
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    models: dict = field(default_factory=dict)
    trained: list = field(default_factory=list)
    resumed: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)
    interrupted: list = field(default_factory=list)
    deleted_versions: list = field(default_factory=list)
    wall_seconds: float = 0.0
    tracking_seconds: float = 0.0
    nodes: set = field(default_factory=set)

    @property
    def ok(self) -> bool:
        """True when no task failed."""
        return not self.failed

    def summary_rows(self) -> list[dict]:
        """One row per model: seed, method, level, acc, sparsity, size, version, status.

        Returns
        -------
        list of dict
        """
        rows = []
        keys = sorted(set(self.models) | set(self.failed), key=lambda k: (k[1] != "baseline", k[1], k[2], k[0]))
        for k in keys:
            m = self.models.get(k)
            if m is None:
                rows.append({"seed": k[0], "method": k[1], "level": k[2], "status": "failed", "error": self.failed[k]})
                continue
            rows.append(
                {
                    "seed": k[0],
                    "method": k[1],
                    "level": k[2],
                    "acc": m.metrics.get("acc"),
                    "sparsity": m.metrics.get("sparsity"),
                    "size_kb": (m.metrics["size_bytes"] / 1024) if "size_bytes" in m.metrics else None,
                    "version": m.version,
                    "status": "resumed" if m.resumed else "trained",
                }
            )
        return rows

    def summary_table(self) -> str:
        """A short text table: mean accuracy, sparsity and size per (method, level) over seeds.

        Returns
        -------
        str
        """
        groups: dict[tuple[str, str], list[dict]] = {}
        for r in self.summary_rows():
            groups.setdefault((r["method"], r["level"]), []).append(r)
        lines = [f"{'method':<22} {'level':<12} {'models':>6} {'acc':>7} {'sparsity':>9} {'size_kb':>9} {'status':<18}"]
        for (method, level), rs in groups.items():
            ok = [r for r in rs if r["status"] != "failed"]

            def mean(key):
                vals = [r[key] for r in ok if r.get(key) is not None]
                return sum(vals) / len(vals) if vals else float("nan")

            status = ",".join(sorted({r["status"] for r in rs}))
            lines.append(
                f"{method:<22} {level:<12} {len(rs):>6} {mean('acc'):>7.4f} {mean('sparsity'):>9.3f} {mean('size_kb'):>9.1f} {status:<18}"
            )
        return "\n".join(lines)
