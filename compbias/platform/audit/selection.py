"""Select the registered model versions an audit looks at.

Every registered version that carries the study's lineage tags
(``compbias.study`` and ``compbias.role``) is a candidate.  A selection names
a registered model, a study, or explicit versions (``NAME/VERSION``); no
selection means "every version not yet audited by the current metrics
version".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient

from compbias.platform.audit import tags as T

PAGE_SIZE = 1000


@dataclass(frozen=True)
class VersionRecord:
    """One registered model version, as the audit sees it.

    Attributes
    ----------
    name, version : str
        Registered model name and version number (as a string, MLflow style).
    run_id : str or None
        The model run whose artifacts hold the predictions.
    tags : dict of str to str
        The version's tags at the time it was listed.
    """

    name: str
    version: str
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def key(self) -> str:
        """``NAME/VERSION``, unique across the registry."""
        return f"{self.name}/{self.version}"

    @property
    def study(self) -> str | None:
        """The ``compbias.study`` tag."""
        return self.tags.get(T.STUDY)

    @property
    def role(self) -> str | None:
        """``baseline`` or ``compressed`` (the ``compbias.role`` tag)."""
        return self.tags.get(T.ROLE)

    @property
    def method(self) -> str:
        """Compression method (``none`` for baselines)."""
        return self.tags.get(T.METHOD) or "none"

    @property
    def level(self) -> str:
        """Compression level as written in the study file (``none`` for baselines)."""
        return self.tags.get(T.LEVEL) or "none"

    @property
    def seed(self) -> str | None:
        """The ``compbias.seed`` tag."""
        return self.tags.get(T.SEED)

    @property
    def baseline_version(self) -> str | None:
        """Version number of the baseline this compressed version came from."""
        return self.tags.get(T.BASELINE_VERSION)

    @property
    def is_baseline(self) -> bool:
        """True for baseline versions."""
        return self.role == T.ROLE_BASELINE

    @property
    def population(self) -> tuple[str, str]:
        """``(method, level)``; ``("baseline", "none")`` for baselines."""
        if self.is_baseline:
            return ("baseline", "none")
        return (self.method, self.level)

    def audited(self, metrics_version: str | None = None) -> bool:
        """True when a complete audit by ``metrics_version`` is recorded on it."""
        return T.is_audited(self.tags, metrics_version)

    def sort_key(self) -> tuple[str, int]:
        """Order by registered model name, then numeric version."""
        return (self.name, int(self.version))


def _record(mv) -> VersionRecord:
    return VersionRecord(name=mv.name, version=str(mv.version), run_id=mv.run_id, tags=dict(mv.tags or {}))


def is_compbias_version(record: VersionRecord) -> bool:
    """Tell whether a version was registered by a compbias study.

    Parameters
    ----------
    record : VersionRecord

    Returns
    -------
    bool
        True when it has a study tag and a ``baseline``/``compressed`` role.
    """
    return bool(record.study) and record.role in (T.ROLE_BASELINE, T.ROLE_COMPRESSED)


def list_versions(client: MlflowClient, *, registered_model: str | None = None) -> list[VersionRecord]:
    """List the compbias model versions in the registry, with their tags.

    Parameters
    ----------
    client : MlflowClient
    registered_model : str, optional
        Restrict to one registered model.

    Returns
    -------
    list of VersionRecord
        Sorted by name and version; versions without lineage tags are left out.
    """
    flt = None
    if registered_model is not None:
        flt = "name = '{}'".format(registered_model.replace("'", "\\'"))
    out: list[VersionRecord] = []
    token = None
    while True:
        page = client.search_model_versions(filter_string=flt, max_results=PAGE_SIZE, page_token=token)
        out.extend(_record(mv) for mv in page)
        token = getattr(page, "token", None)
        if not token:
            break
    return sorted((r for r in out if is_compbias_version(r)), key=VersionRecord.sort_key)


def parse_version_spec(spec: str) -> tuple[str, str]:
    """Parse ``NAME/VERSION`` or ``models:/NAME/VERSION``.

    Parameters
    ----------
    spec : str

    Returns
    -------
    (str, str)
        Registered model name and version number.

    Raises
    ------
    ValueError
        When the text is not of that form.
    """
    text = spec.strip()
    if text.startswith("models:/"):
        text = text[len("models:/"):]
    name, sep, version = text.rpartition("/")
    if not sep or not name or not version.isdigit():
        raise ValueError(
            f"cannot read model version {spec!r}: write it as NAME/VERSION, e.g. compbias-digits/3"
        )
    return name, version


@dataclass(frozen=True)
class Selection:
    """What an audit looks at.

    Attributes
    ----------
    registered_model : str, optional
        Every version of this registered model.
    study : str, optional
        Every version tagged with this study.
    versions : tuple of str
        Explicit ``NAME/VERSION`` specs.
    force : bool
        Audit the selected versions again even when already audited by the
        current metrics version (an explicit selection implies it).
    """

    registered_model: str | None = None
    study: str | None = None
    versions: tuple[str, ...] = ()
    force: bool = False

    @property
    def empty(self) -> bool:
        """True when nothing is named: the incremental "all new versions" audit."""
        return self.registered_model is None and self.study is None and not self.versions


def select_targets(
    records: Sequence[VersionRecord], selection: Selection, metrics_version: str
) -> list[VersionRecord]:
    """Pick the versions to audit from the listed ones.

    Parameters
    ----------
    records : sequence of VersionRecord
        All compbias versions (from :func:`list_versions`).
    selection : Selection
    metrics_version : str

    Returns
    -------
    list of VersionRecord
        The versions to audit, sorted.

    Raises
    ------
    ValueError
        When an explicitly named version, model or study does not exist, so a
        typo is not mistaken for "nothing to do".
    """
    if selection.empty:
        return [r for r in records if not r.audited(metrics_version)]
    chosen: list[VersionRecord] = list(records)
    if selection.registered_model is not None:
        chosen = [r for r in chosen if r.name == selection.registered_model]
        if not chosen:
            names = sorted({r.name for r in records})
            raise ValueError(
                f"no compbias versions in registered model {selection.registered_model!r}; "
                f"registered models with compbias versions: {names or 'none'}"
            )
    if selection.study is not None:
        chosen = [r for r in chosen if r.study == selection.study]
        if not chosen:
            studies = sorted({r.study for r in records if r.study})
            raise ValueError(f"no registered versions of study {selection.study!r}; known studies: {studies or 'none'}")
    if selection.versions:
        by_key = {r.key: r for r in chosen}
        picked = []
        for spec in selection.versions:
            name, version = parse_version_spec(spec)
            rec = by_key.get(f"{name}/{version}")
            if rec is None:
                raise ValueError(
                    f"model version {name}/{version} is not a registered compbias version "
                    "(it does not exist or has no compbias.study/compbias.role tags)"
                )
            picked.append(rec)
        chosen = picked
        return sorted(set(chosen), key=VersionRecord.sort_key)
    if not selection.force:
        chosen = [r for r in chosen if not r.audited(metrics_version)]
    return sorted(chosen, key=VersionRecord.sort_key)


def study_groups(records: Iterable[VersionRecord]) -> dict[tuple[str, str], list[VersionRecord]]:
    """Group versions by ``(registered model, study)``, the unit of one audit run.

    Parameters
    ----------
    records : iterable of VersionRecord

    Returns
    -------
    dict
        ``(name, study) -> sorted list of versions``.
    """
    out: dict[tuple[str, str], list[VersionRecord]] = {}
    for r in records:
        out.setdefault((r.name, r.study or ""), []).append(r)
    return {k: sorted(v, key=VersionRecord.sort_key) for k, v in sorted(out.items())}
