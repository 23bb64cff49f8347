"""Fetch each version's predictions table (and its member.json and study file) from MLflow.

Run artifacts are immutable once a model run has finished, so downloaded
files are kept in a local cache keyed by tracking store and run id; an
incremental audit then reads the baseline population from disk instead of
downloading it again.  A version whose artifacts are missing or unreadable
does not stop the audit: its :class:`Fetched` carries the reason instead of a
table, and the version is tagged ``error``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from compbias import contract as C
from compbias.platform.audit.selection import VersionRecord
from compbias.platform.audit.settings import default_cache_dir  # noqa: F401  (re-exported: the cache is the fetcher's)
from compbias.platform.audit.studyfile import StudyFile
from compbias.platform.config import StudyConfigError

PREDICTIONS = C.PREDICTIONS
STUDY_FILE = C.STUDY_FILE
MEMBER_FILE = C.MEMBER_FILE
REQUIRED_COLUMNS = C.REQUIRED_COLUMNS
NON_GROUP_COLUMNS = C.NON_GROUP_COLUMNS
group_columns = C.group_columns


class ArtifactError(Exception):
    """A version's artifact is missing or unusable; the message says which and why."""


@dataclass
class Fetched:
    """The predictions of one version, or why they could not be read.

    Attributes
    ----------
    record : VersionRecord
    predictions : pandas.DataFrame or None
        Sorted by ``example_id``; None when ``error`` is set.
    error : str or None
    """

    record: VersionRecord
    predictions: pd.DataFrame | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the predictions were read and validated."""
        return self.error is None


class ArtifactFetcher:
    """Download run artifacts through MLflow, with an on-disk cache.

    Parameters
    ----------
    client : MlflowClient
    cache_dir : path-like or None
        Where to keep downloaded files; None disables the cache.
    workers : int
        Parallel downloads.
    """

    def __init__(self, client: MlflowClient, cache_dir: str | os.PathLike | None = None, workers: int = 4):
        self.client = client
        self.workers = max(1, int(workers))
        self.cache_dir = None
        if cache_dir is not None:
            uri = str(client.tracking_uri)
            self.cache_dir = Path(cache_dir) / hashlib.sha1(uri.encode()).hexdigest()[:16]

    def path(self, run_id: str, artifact: str) -> Path:
        """Return a local path to one artifact of a run, downloading it when needed.

        Parameters
        ----------
        run_id : str
        artifact : str
            Path inside the run's artifact root.

        Returns
        -------
        pathlib.Path

        Raises
        ------
        ArtifactError
            When the run or the artifact does not exist or cannot be downloaded.
        """
        if self.cache_dir is not None:
            cached = self.cache_dir / run_id / artifact
            if cached.is_file():
                return cached
        tmp = Path(tempfile.mkdtemp(prefix="compbias-fetch-", dir=self._tmp_root()))
        try:
            local = Path(self.client.download_artifacts(run_id, artifact, str(tmp)))
        except Exception as exc:  # MlflowException, OSError, botocore errors...
            shutil.rmtree(tmp, ignore_errors=True)
            raise ArtifactError(f"{artifact} of run {run_id} could not be downloaded: {_short(exc)}") from exc
        if not local.is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            raise ArtifactError(f"{artifact} of run {run_id} is missing (no such file in the run's artifacts)")
        if self.cache_dir is None:
            return local
        cached = self.cache_dir / run_id / artifact
        cached.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, cached)  # atomic: readers see the whole file or none
        shutil.rmtree(tmp, ignore_errors=True)
        return cached

    def _tmp_root(self) -> str | None:
        if self.cache_dir is None:
            return None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return str(self.cache_dir)

    def predictions(self, record: VersionRecord) -> Fetched:
        """Fetch and validate one version's ``predictions.parquet``.

        Parameters
        ----------
        record : VersionRecord

        Returns
        -------
        Fetched
            With the table, or with the reason it is unusable.
        """
        if not record.run_id:
            return Fetched(record, error="the model version has no run id, so it has no predictions artifact")
        try:
            path = self.path(record.run_id, PREDICTIONS)
            try:
                frame = pd.read_parquet(path)
            except Exception as exc:
                raise ArtifactError(f"{PREDICTIONS} of run {record.run_id} is not a readable parquet file: {_short(exc)}") from exc
            return Fetched(record, predictions=validate_predictions(frame, where=f"{PREDICTIONS} of run {record.run_id}"))
        except ArtifactError as exc:
            return Fetched(record, error=str(exc))

    def fetch_all(self, records: Sequence[VersionRecord]) -> dict[str, Fetched]:
        """Fetch the predictions of many versions in parallel.

        Parameters
        ----------
        records : sequence of VersionRecord

        Returns
        -------
        dict of str to Fetched
            Keyed by ``NAME/VERSION``.
        """
        if self.workers == 1 or len(records) <= 1:
            return {r.key: self.predictions(r) for r in records}
        with ThreadPoolExecutor(self.workers) as pool:
            return {f.record.key: f for f in pool.map(self.predictions, records)}

    def study_file(self, records: Sequence[VersionRecord]) -> tuple[StudyFile, str | None]:
        """Read and validate the study file logged with the first run that has a readable one.

        Parameters
        ----------
        records : sequence of VersionRecord
            Versions of one study, baselines first preferably.

        Returns
        -------
        study : StudyFile
            ``StudyFile()`` when no run has a readable ``study.yaml`` (or it is invalid).
        problem : str or None
            Why the study file found does not validate (the audit then
            reports it for every version rather than guess with defaults).
        """
        for run_id, path in self._artifact_paths(records, STUDY_FILE):
            try:
                data = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError):
                continue
            if not isinstance(data, dict):
                continue
            where = f"{STUDY_FILE} of run {run_id}"
            try:
                return StudyFile.parse(data, source=where), None
            except StudyConfigError as exc:
                return StudyFile(), (f"the study file ({where}) is invalid: {'; '.join(exc.problems)}; the audit reads "
                                     f"its dataset: and audit: sections and does not guess: fix them in the runs' {STUDY_FILE}")
        return StudyFile(), None

    def _artifact_paths(self, records: Sequence[VersionRecord], artifact: str):
        """``(run_id, local path)`` of ``artifact`` for each run that has it, in the order of ``records``."""
        for r in records:
            if not r.run_id:
                continue
            try:
                yield r.run_id, self.path(r.run_id, artifact)
            except (ArtifactError, OSError):
                continue

    def member_info(self, records: Sequence[VersionRecord]) -> tuple[C.MemberInfo | None, str | None]:
        """Read ``member.json`` (:class:`compbias.contract.MemberInfo`) from the first run that has one.

        Parameters
        ----------
        records : sequence of VersionRecord
            Versions of one study, baselines first preferably.

        Returns
        -------
        info : MemberInfo or None
            None when no run has a ``member.json`` (studies logged before it
            existed, or members registered without one).
        problem : str or None
            Why a ``member.json`` that exists could not be used (the first
            such problem), so that the audit can report it rather than guess.
        """
        problem = None
        for run_id, path in self._artifact_paths(records, MEMBER_FILE):
            try:
                return C.MemberInfo.from_json(path.read_text()), None
            except OSError:
                continue
            except C.ContractError as exc:
                problem = problem or f"{MEMBER_FILE} of run {run_id} is unusable: {exc}"
        return None, problem

    def class_names(self, records: Sequence[VersionRecord]) -> list[str] | None:
        """The class names of a study logged before ``member.json`` existed (``rates/per_class.parquet``).

        Parameters
        ----------
        records : sequence of VersionRecord

        Returns
        -------
        list of str or None
            The ``class_name`` column of the first run whose per-class table has one.
        """
        for _, path in self._artifact_paths(records, "rates/per_class.parquet"):
            try:
                frame = pd.read_parquet(path)
            except Exception:  # unreadable: try the next run
                continue
            if "class_name" in frame.columns and len(frame):
                if "class" in frame.columns:
                    frame = frame.sort_values("class")
                return [str(x) for x in frame["class_name"].tolist()]
        return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def validate_predictions(frame: pd.DataFrame, *, where: str = "predictions", num_classes: int | None = None) -> pd.DataFrame:
    """Check a predictions table against :func:`compbias.contract.validate_predictions`.

    Parameters
    ----------
    frame : pandas.DataFrame
    where : str
        Named in error messages.
    num_classes : int, optional
        When known, labels and predictions must be class ids below it.

    Returns
    -------
    pandas.DataFrame
        Sorted by ``example_id`` with a fresh index.

    Raises
    ------
    ArtifactError
        The contract's error, as an artifact problem of this version.
    """
    try:
        return C.validate_predictions(frame, where=where, num_classes=num_classes)
    except C.ContractError as exc:
        raise ArtifactError(str(exc)) from None


def as_codes(values: np.ndarray) -> tuple[np.ndarray, list]:
    """Turn a group column into integer codes 0..G-1.

    Parameters
    ----------
    values : numpy.ndarray

    Returns
    -------
    codes : numpy.ndarray of int64
    levels : list
        The original value of each code.
    """
    levels, codes = np.unique(np.asarray(values), return_inverse=True)
    return codes.astype(np.int64), levels.tolist()
