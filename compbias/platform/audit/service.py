"""The audit service: select, claim, fetch, compute, log, tag.

:func:`run_audit` is one audit pass.  With an empty selection it audits every
registered compbias version not yet audited by the current metrics version,
one MLflow run per study; with nothing new it logs nothing.  :func:`watch`
repeats it on a schedule.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from compbias import contract as C
from compbias.platform.audit import tags as T
from compbias.platform.audit.claims import DEFAULT_TTL_SECONDS, ClaimManager, backend_for
from compbias.platform.audit.fetch import ArtifactFetcher, Fetched, default_cache_dir
from compbias.platform.audit.population import PopulationError, build_study_data
from compbias.platform.audit.registry import reconcile_alias, write_tags_batch, write_version_tags
from compbias.platform.audit.selection import Selection, VersionRecord, list_versions, select_targets, study_groups
from compbias.platform.tracking import configure_tracking

log = logging.getLogger("compbias.audit")

AUDIT_EXPERIMENT = "compbias/audits"


@dataclass
class AuditOptions:
    """How to audit; None means "take it from the study file".

    Attributes
    ----------
    thresholds : dict
        ``cev``, ``sde``, ``worst_group_fpr_change``, ``acc_drop``; a value
        given here overrides the study file's.
    alias : str, optional
        Alias for passing versions (study file default ``audited``).
    cie_fractions : tuple of float, optional
    bootstrap : int, optional
        Bootstrap resamples for confidence intervals (0 disables them).
    probe_size : int, optional
        Probe examples for SVCCA/CKA.
    similarity : bool
        Compute SVCCA/CKA (needs the models' weights and ``compbias.jobs``).
    confidence : float
        Level of the confidence intervals.
    seed : int
        Seed of the bootstrap and of the probe choice.
    smoothing : float
        Additive smoothing of the rates (0: classes with a zero baseline rate
        are dropped from CEV/SDE).
    intervals : {"two_level", "examples"}, optional
        What the bootstrap resamples; default the study file's
        ``audit.intervals`` (``two_level``).
    experiment : str, optional
        Experiment of the audit run; default: the study's own experiment.
    cache_dir : path, optional
        Artifact cache (None disables it).
    output_dir : path, optional
        Also copy the report, tables and figures there.
    claim_ttl : float
        Seconds after which a silent auditor's claims expire.
    workers : int
        Parallel artifact downloads.
    figures : bool
        Draw figures into the HTML report.
    gallery : bool
        Draw the CIE image gallery (loads the study's dataset).
    """

    thresholds: dict = field(default_factory=dict)
    alias: str | None = None
    cie_fractions: tuple[float, ...] | None = None
    bootstrap: int | None = None
    probe_size: int | None = None
    similarity: bool = True
    confidence: float = 0.95
    seed: int = 0
    smoothing: float = 0.0
    intervals: str | None = None
    experiment: str | None = None
    cache_dir: Path | None = field(default_factory=default_cache_dir)
    output_dir: Path | None = None
    claim_ttl: float = DEFAULT_TTL_SECONDS
    workers: int = 4
    figures: bool = True
    gallery: bool = True


@dataclass
class AuditResult:
    """What one audit run did.

    Attributes
    ----------
    run_id : str or None
        The audit run (None when nothing was audited).
    registered_model, study : str
    statuses : dict of str to str
        ``NAME/VERSION -> pass | fail | error``.
    reasons : dict of str to str
        Why a version failed or errored.
    summary : dict
        Headline numbers (worst CEV and SDE, CIE accuracy, worst group).
    report_path : str or None
        Local path of the HTML report when the artifact store is local or an
        output directory was given.
    timings : dict of str to float
        Seconds spent fetching, computing and logging.
    alias_version : str or None
        The version holding the alias after this audit.
    """

    run_id: str | None
    registered_model: str
    study: str
    statuses: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    report_path: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    alias_version: str | None = None


@dataclass
class StudyFacts:
    """What the audit knows about a population's task, and where it came from.

    Attributes
    ----------
    num_classes : int or None
    positive_class : int or None
        A class id (a name in an old study file is resolved to one).
    groups : list of str or None
        Declared group columns.
    source : str
        ``member.json``, ``study file`` or ``defaults``.
    problem : str or None
        Why the population cannot be audited as declared (an unusable
        ``member.json``, a positive class that names no class); every
        version audited is then an error with this reason.
    """

    num_classes: int | None = None
    positive_class: int | None = None
    groups: list[str] | None = None
    source: str = "defaults"
    problem: str | None = None


def resolve_facts(study_file: dict, info=None, *, class_names=None, info_problem: str | None = None) -> StudyFacts:
    """Decide the number of classes, positive class id and group columns of a population.

    In order: the members' ``member.json`` (:class:`compbias.contract.MemberInfo`),
    else the study file's ``dataset`` section (a ``positive_class`` given
    as a class *name* is resolved with :func:`compbias.contract.resolve_class`
    against the class names the study logged), else the defaults (classes
    counted from the predictions, no positive class, integer columns as groups).

    Parameters
    ----------
    study_file : dict
        The parsed ``study.yaml`` (empty when there is none).
    info : compbias.contract.MemberInfo, optional
    class_names : callable or sequence of str, optional
        The class names, or a function returning them (called only when a
        name has to be resolved).
    info_problem : str, optional
        Why a ``member.json`` that exists was unusable.

    Returns
    -------
    StudyFacts
    """
    if info_problem:
        return StudyFacts(source=C.MEMBER_FILE, problem=info_problem)
    if info is not None:
        return StudyFacts(info.num_classes, info.positive_class, list(info.groups) if info.groups is not None else None,
                          source=C.MEMBER_FILE)
    dataset = (study_file.get("dataset") if isinstance(study_file, dict) else None) or {}
    groups = dataset.get("groups")
    groups = [str(g) for g in groups] if isinstance(groups, (list, tuple)) else None
    value = dataset.get("positive_class")
    facts = StudyFacts(groups=groups, source="study file" if study_file else "defaults")
    if value is None:
        return facts
    names = class_names() if callable(class_names) else class_names
    names = list(names or [])
    try:
        if names:
            facts.num_classes = len(names)
            facts.positive_class = C.resolve_class(value, len(names), names)
        elif isinstance(value, (int, str)) and not isinstance(value, bool) and str(value).strip().isdigit():
            facts.positive_class = int(value)  # an id; checked against the classes seen once the predictions are lined up
        else:
            raise C.ContractError(f"class {value!r} is a class name, and the runs logged no class names to resolve it")
    except C.ContractError as exc:
        facts.problem = (
            f"the study file's dataset.positive_class cannot be used: {exc}; give a class id, or log the members "
            f"with a {C.MEMBER_FILE} (compbias register --positive-class, or re-run the study with this compbias)"
        )
    return facts


def _resolve_settings(study_file: dict, options: AuditOptions, facts: StudyFacts | None = None):
    from compbias.platform.audit.compute import AuditSettings
    from compbias.platform.config import AuditSpec

    raw = study_file.get("audit") if isinstance(study_file, dict) else None
    try:
        spec = AuditSpec.model_validate(raw or {})
    except Exception as exc:
        log.warning("the study file's audit section is invalid (%s); using the defaults", exc)
        spec = AuditSpec()
    thresholds = spec.thresholds.model_dump()
    thresholds.update({k: v for k, v in (options.thresholds or {}).items() if v is not None})
    facts = facts if facts is not None else resolve_facts(study_file)
    return AuditSettings(
        thresholds=thresholds,
        cie_fractions=tuple(options.cie_fractions or spec.cie_fractions),
        bootstrap=spec.bootstrap if options.bootstrap is None else int(options.bootstrap),
        probe_size=spec.probe_size if options.probe_size is None else int(options.probe_size),
        confidence=options.confidence,
        seed=options.seed,
        smoothing=options.smoothing,
        positive_class=facts.positive_class,
        alias=options.alias or spec.alias,
        gate=spec.gate,
        min_count=spec.min_count,
        intervals=options.intervals or spec.intervals,
    )


def _experiment_for(client: MlflowClient, records: list[VersionRecord], options: AuditOptions) -> str:
    name = options.experiment
    if name is None:
        for r in records:
            if r.run_id:
                try:
                    return client.get_run(r.run_id).info.experiment_id
                except Exception:
                    continue
        name = AUDIT_EXPERIMENT
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


def run_audit(
    client: MlflowClient | None = None,
    selection: Selection | None = None,
    options: AuditOptions | None = None,
    *,
    claims: ClaimManager | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[AuditResult]:
    """Run one audit pass.

    Parameters
    ----------
    client : MlflowClient, optional
        Default: a client of the store ``MLFLOW_TRACKING_URI`` names
        (:func:`~compbias.platform.tracking.configure_tracking`; no process-wide URI is set).
    selection : Selection, optional
        Empty (default): every compbias version not yet audited by the
        current metrics version.
    options : AuditOptions, optional
    claims : ClaimManager, optional
        Claim store (default: the atomic backend for the client's store).
    progress : callable, optional
        Called with one-line progress messages.

    Returns
    -------
    list of AuditResult
        One per audited study; empty when there was nothing to audit (no run
        is logged then).

    Raises
    ------
    ValueError
        When an explicit selection names versions, models or studies that do
        not exist.
    """
    client = client if client is not None else configure_tracking()  # explicit: no process URI is set
    selection = selection or Selection()
    options = options or AuditOptions()
    say = progress or (lambda msg: log.info(msg))
    mv = T.current_metrics_version()
    records = list_versions(client, registered_model=selection.registered_model)
    targets = select_targets(records, selection, mv)
    if not targets:
        _reconcile_all(client, records, mv)
        say("nothing to audit: every registered version is audited by metrics version " + mv)
        return []
    claims = claims or ClaimManager(backend_for(client), mv, ttl=options.claim_ttl)
    results = []
    for (name, study), group in study_groups(targets).items():
        with claims:
            held = claims.acquire([r.key for r in group])
            skipped = len(group) - len(held)
            if skipped:
                say(f"{skipped} version(s) of {name} are being audited by another auditor; skipping them")
            fresh = {}
            for key in held:
                rec = next(r for r in group if r.key == key)
                cur = client.get_model_version(rec.name, rec.version)
                rec = VersionRecord(rec.name, rec.version, cur.run_id, dict(cur.tags or {}))
                if not (selection.force or selection.versions) and rec.audited(mv):
                    continue  # audited by someone else since we listed
                fresh[key] = rec
            claims.release([k for k in held if k not in fresh])
            if not fresh:
                continue
            context = [r for r in records if r.name == name and r.study == study]
            result = _audit_study(client, name, study, list(fresh.values()), context, options, claims, mv, say)
            claims.release()
        results.append(result)
    return results


def _reconcile_all(client: MlflowClient, records: list[VersionRecord], mv: str) -> None:
    by_model: dict[str, list[VersionRecord]] = {}
    for r in records:
        by_model.setdefault(r.name, []).append(r)
    for name, recs in by_model.items():
        aliases = {r.tags.get(C.AUDIT_ALIAS) for r in recs if r.audited(mv)} - {None}
        for alias in aliases:
            reconcile_alias(client, name, alias, mv, recs)


def _audit_study(client, name, study, targets, context, options, claims, mv, say) -> AuditResult:
    from compbias.platform.audit import compute
    from compbias.platform.audit.writer import write_audit_run

    timings = {"fetch": 0.0, "compute": 0.0, "log": 0.0}
    t0 = time.perf_counter()
    target_keys = {r.key for r in targets}
    target_pops = {r.population for r in targets if not r.is_baseline}
    baseline_keys = {r.key for r in context if r.is_baseline}
    needed = [r for r in context if r.is_baseline or r.population in target_pops or r.key in target_keys]
    needed = sorted({r.key: r for r in [*needed, *targets]}.values(), key=VersionRecord.sort_key)
    say(f"auditing {len(targets)} version(s) of {name} (study {study}) against {len(baseline_keys)} baseline(s)")
    fetcher = ArtifactFetcher(client, options.cache_dir, workers=options.workers)
    broken = {}  # versions whose tags break the contract (another schema, a compressed one without lineage ...)
    for r in needed:
        try:
            C.Member.from_tags(r.tags)
        except C.ContractError as exc:
            broken[r.key] = Fetched(r, error=f"its tags break the population contract (docs/contract.md): {exc}")
    fetched = fetcher.fetch_all([r for r in needed if r.key not in broken])
    fetched.update(broken)
    ordered = [r for r in needed if r.is_baseline] + [r for r in needed if not r.is_baseline]
    study_file = fetcher.study_config(ordered)
    info, info_problem = fetcher.member_info(ordered)
    facts = resolve_facts(study_file, info, class_names=lambda: fetcher.class_names(ordered), info_problem=info_problem)
    settings = _resolve_settings(study_file, options, facts)
    errors = {k: f.error for k, f in fetched.items() if not f.ok}
    timings["fetch"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    data = None
    if facts.problem:
        for r in targets:
            errors.setdefault(r.key, facts.problem)
    else:
        try:
            data = build_study_data(list(fetched.values()), declared_groups=facts.groups, n_classes=facts.num_classes)
            errors.update(data.errors)
            if settings.positive_class is not None and settings.positive_class >= data.n_classes:
                raise PopulationError(
                    f"positive_class {settings.positive_class} is not a class id of this population "
                    f"({data.n_classes} classes); fix dataset.positive_class (or the members' {'member.json'})"
                )
        except PopulationError as exc:
            data = None
            for r in targets:
                errors.setdefault(r.key, str(exc))
    outcome = compute.audit_study(data, targets, settings, errors=errors)
    if data is not None and options.similarity and settings.probe_size > 0:
        from compbias.platform.audit import similarity

        outcome.add_similarity(
            similarity.study_similarity(client, data, targets, settings, study_file, fetcher, outcome.tables.get("models"))
        )
    timings["compute"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    exp_id = _experiment_for(client, targets, options)
    close_abandoned_runs(client, exp_id, options.claim_ttl)
    run_id, report_path = write_audit_run(
        client, exp_id, name, study, outcome, settings, mv, figures=options.figures, output_dir=options.output_dir,
        timings=timings, study_file=study_file if options.gallery else None, dataset=study_file.get("dataset") or {},
    )
    statuses, reasons = {}, {}
    still = set(claims.still_held([r.key for r in targets]))
    to_tag = []
    for r in targets:
        if r.key not in still:
            say(f"{r.key}: another auditor took over its claim; leaving its tags to that auditor")
            continue
        o = outcome.versions[r.key]
        values = dict(o.values)
        values["reason"] = o.reason
        values["alias"] = settings.alias
        to_tag.append((r, o.status, values))
        statuses[r.key], reasons[r.key] = o.status, o.reason

    def tag(item):
        r, status, values = item
        write_version_tags(client, r, status, values, run_id=run_id, metrics_version=mv)

    if to_tag and write_tags_batch(client, to_tag, run_id=run_id, metrics_version=mv) is not None:
        pass  # a SQL registry: every version's tags in one transaction
    elif _remote(client) and options.workers > 1 and len(to_tag) > 1:
        # a tracking server answers requests in parallel; each version's own tags stay in order
        with ThreadPoolExecutor(options.workers) as pool:
            list(pool.map(tag, to_tag))
    else:  # a local database serialises writers anyway
        for item in to_tag:
            tag(item)
    alias_version = reconcile_alias(client, name, settings.alias, mv)
    timings["log"] = time.perf_counter() - t2
    client.log_batch(run_id, metrics=[Metric("audit/seconds_log", timings["log"], int(time.time() * 1000), 0)])
    return AuditResult(
        run_id=run_id,
        registered_model=name,
        study=study,
        statuses=statuses,
        reasons={k: v for k, v in reasons.items() if v},
        summary=outcome.summary,
        report_path=report_path,
        timings=timings,
        alias_version=alias_version,
    )


def close_abandoned_runs(client: MlflowClient, experiment_id: str, ttl: float) -> list[str]:
    """Mark audit runs (and their per-population children) left RUNNING by killed auditors as KILLED.

    An audit run is created only after the computation, and its logging takes
    seconds; one still RUNNING after ``ttl`` seconds belongs to an auditor
    that died.  No version's status tag points at it (the status is written
    after the run is finished), so closing it loses nothing.  Its child runs
    (``compbias.run_kind=audit_population``) are closed with it, also those
    that finished: they belong to an audit that did not.  A child still
    RUNNING after ``ttl`` is closed too, whatever its parent's state.

    Parameters
    ----------
    client : MlflowClient
    experiment_id : str
    ttl : float
        Seconds.

    Returns
    -------
    list of str
        The run ids closed (audit runs, then children).
    """
    from compbias.platform.audit.writer import PARENT_RUN_TAG, RUN_KIND_AUDIT_POPULATION

    now_ms = time.time() * 1000
    closed: list[str] = []
    why = "its auditor stopped before finishing; a later audit redid the work"

    def search(flt: str) -> list:
        try:
            return client.search_runs([experiment_id], filter_string=flt, max_results=1000)
        except Exception:  # pragma: no cover - a search failure must not stop the audit
            log.warning("could not search for abandoned audit runs (%s)", flt, exc_info=True)
            return []

    def close(run) -> None:
        client.set_tag(run.info.run_id, C.AUDIT_ABANDONED, why)
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)

    running = "attributes.status = 'RUNNING'"
    for run in search(f"tags.`{T.RUN_KIND}` = '{T.RUN_KIND_AUDIT}' and {running}"):
        if now_ms - run.info.start_time > ttl * 1000:
            close(run)
            for child in search(f"tags.`{PARENT_RUN_TAG}` = '{run.info.run_id}'"):
                if child.info.status in ("RUNNING", "FINISHED", "SCHEDULED"):
                    close(child)
    for child in search(f"tags.`{T.RUN_KIND}` = '{RUN_KIND_AUDIT_POPULATION}' and {running}"):
        if child.info.run_id not in closed and now_ms - child.info.start_time > ttl * 1000:
            close(child)
    return closed


def _remote(client: MlflowClient) -> bool:
    uri = str(getattr(client, "_registry_uri", None) or client.tracking_uri)
    return uri.split(":", 1)[0] in ("http", "https", "databricks")


def parse_interval(text: str) -> float:
    """Parse an interval such as ``90``, ``90s``, ``10m``, ``2h`` or ``1d`` into seconds.

    Parameters
    ----------
    text : str

    Returns
    -------
    float

    Raises
    ------
    ValueError
        When the text is not a positive number with an optional s/m/h/d unit.
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = str(text).strip().lower()
    scale = units.get(t[-1:], None)
    num = t[:-1] if scale else t
    try:
        value = float(num) * (scale or 1)
    except ValueError:
        raise ValueError(f"cannot read interval {text!r}: write a number with an optional unit s, m, h or d (e.g. 10m)") from None
    if value <= 0:
        raise ValueError(f"interval must be positive, got {text!r}")
    return value


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
