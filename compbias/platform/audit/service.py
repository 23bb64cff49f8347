"""The audit service: select, claim, fetch, compute, log, tag.

:func:`run_audit` is one audit pass.  With an empty selection it audits every
registered compbias version not yet audited by the current metrics version,
one MLflow run per study; with nothing new it logs nothing.  Each study goes
through typed stages: :func:`fetch_study` (predictions, the study file parsed
once, facts, settings), :func:`study_data` (populations),
:func:`compbias.platform.audit.compute.audit_study`, the audit run
(:func:`compbias.platform.audit.writer.write_audit_run`), then
:func:`tag_versions`.  :func:`compbias.platform.audit.watch.watch` repeats
a pass on a schedule.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from compbias import contract as C
from compbias.platform.audit import tags as T
from compbias.platform.audit.abandoned import close_abandoned_runs
from compbias.platform.audit.claims import ClaimManager, backend_for
from compbias.platform.audit.fetch import ArtifactFetcher, Fetched
from compbias.platform.audit.population import PopulationError, StudyData, build_study_data
from compbias.platform.audit.registry import reconcile_alias, write_tags_batch, write_version_tags
from compbias.platform.audit.selection import Selection, VersionRecord, list_versions, select_targets, study_groups
from compbias.platform.audit.settings import AuditOptions, AuditSettings
from compbias.platform.audit.studyfile import StudyFacts, StudyFile, TestSplit, resolve_facts
from compbias.platform.tracking import configure_tracking

__all__ = [
    "AUDIT_EXPERIMENT", "AuditOptions", "AuditResult", "StudyFacts", "StudyInputs", "close_abandoned_runs",
    "fetch_study", "resolve_facts", "run_audit", "study_data", "tag_versions",
]

log = logging.getLogger("compbias.audit")

AUDIT_EXPERIMENT = "compbias/audits"


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


def _remote(client: MlflowClient) -> bool:
    uri = str(getattr(client, "_registry_uri", None) or client.tracking_uri)
    return uri.split(":", 1)[0] in ("http", "https", "databricks")


@dataclass
class StudyInputs:
    """What the fetch stage gives the computation: the predictions, the study file, the facts, the settings.

    Attributes
    ----------
    fetched : dict of str to Fetched
        Every version needed (targets, their populations, the baselines).
    study_file : StudyFile
        The population's study file, parsed once.
    facts : StudyFacts
    settings : AuditSettings
        The study file's ``audit:`` section with the caller's overrides.
    errors : dict of str to str
        Versions that cannot be audited, with the reason.
    fetcher : ArtifactFetcher
        Its cache also keeps the model files SVCCA downloads.
    """

    fetched: dict[str, Fetched]
    study_file: StudyFile
    facts: StudyFacts
    settings: AuditSettings
    errors: dict[str, str]
    fetcher: ArtifactFetcher


def fetch_study(client: MlflowClient, targets: list[VersionRecord], context: list[VersionRecord],
                options: AuditOptions) -> StudyInputs:
    """Fetch what auditing ``targets`` needs and resolve the study's facts and settings.

    Parameters
    ----------
    client : MlflowClient
    targets : list of VersionRecord
        The versions being audited.
    context : list of VersionRecord
        Every version of the study (the baselines and the targets' populations are read too).
    options : AuditOptions

    Returns
    -------
    StudyInputs
    """
    target_keys = {r.key for r in targets}
    target_pops = {r.population for r in targets if not r.is_baseline}
    needed = [r for r in context if r.is_baseline or r.population in target_pops or r.key in target_keys]
    needed = sorted({r.key: r for r in [*needed, *targets]}.values(), key=VersionRecord.sort_key)
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
    study_file, study_problem = fetcher.study_file(ordered)
    info, info_problem = fetcher.member_info(ordered)
    facts = resolve_facts(study_file, info, class_names=lambda: fetcher.class_names(ordered), info_problem=info_problem)
    facts.problem = facts.problem or study_problem
    settings = options.resolve(study_file.audit, positive_class=facts.positive_class)
    errors = {k: f.error for k, f in fetched.items() if not f.ok}
    return StudyInputs(fetched, study_file, facts, settings, errors, fetcher)


def study_data(inputs: StudyInputs, targets: list[VersionRecord]) -> StudyData | None:
    """Line the fetched predictions up into populations; None (every target an error) when that is impossible.

    The reasons go into ``inputs.errors``.
    """
    facts, settings, errors = inputs.facts, inputs.settings, inputs.errors
    if facts.problem:
        for r in targets:
            errors.setdefault(r.key, facts.problem)
        return None
    try:
        data = build_study_data(list(inputs.fetched.values()), declared_groups=facts.groups, n_classes=facts.num_classes)
        errors.update(data.errors)
        if settings.positive_class is not None and settings.positive_class >= data.n_classes:
            raise PopulationError(
                f"positive_class {settings.positive_class} is not a class id of this population "
                f"({data.n_classes} classes); fix dataset.positive_class (or the members' {C.MEMBER_FILE})"
            )
    except PopulationError as exc:
        for r in targets:
            errors.setdefault(r.key, str(exc))
        return None
    return data


def _audit_study(client, name, study, targets, context, options, claims, mv, say) -> AuditResult:
    from compbias.platform.audit import compute
    from compbias.platform.audit.writer import write_audit_run

    timings = {"fetch": 0.0, "compute": 0.0, "log": 0.0}
    t0 = time.perf_counter()
    n_baselines = len({r.key for r in context if r.is_baseline})
    say(f"auditing {len(targets)} version(s) of {name} (study {study}) against {n_baselines} baseline(s)")
    inputs = fetch_study(client, targets, context, options)
    settings = inputs.settings
    timings["fetch"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    data = study_data(inputs, targets)
    outcome = compute.audit_study(data, targets, settings, errors=inputs.errors)
    split = TestSplit(inputs.study_file.dataset)  # loaded at most once, by the probe set or the gallery
    if data is not None and options.similarity and settings.probe_size > 0:
        from compbias.platform.audit import similarity

        outcome.add_similarity(
            similarity.study_similarity(client, data, targets, settings, split, inputs.fetcher, outcome.tables.get("models"))
        )
    timings["compute"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    exp_id = _experiment_for(client, targets, options)
    close_abandoned_runs(client, exp_id, options.claim_ttl)
    run_id, report_path = write_audit_run(
        client, exp_id, name, study, outcome, settings, mv, figures=options.figures, output_dir=options.output_dir,
        timings=timings, split=split if options.gallery else None, dataset_kind=inputs.study_file.dataset_kind,
    )
    statuses, reasons = tag_versions(client, targets, outcome, run_id, claims, options, mv, say)
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


def tag_versions(client: MlflowClient, targets: list[VersionRecord], outcome, run_id: str, claims: ClaimManager,
                 options: AuditOptions, mv: str, say) -> tuple[dict[str, str], dict[str, str | None]]:
    """Write each target's verdict tags, for the versions whose claims this auditor still holds.

    Parameters
    ----------
    client : MlflowClient
    targets : list of VersionRecord
    outcome : StudyAudit
    run_id : str
        The audit run the tags point at.
    claims : ClaimManager
    options : AuditOptions
        ``workers``: parallel tag writes to a tracking server.
    mv : str
        The metrics version.
    say : callable

    Returns
    -------
    statuses, reasons : dict of str
        By ``NAME/VERSION``, for the versions tagged.
    """
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
        values["alias"] = outcome.settings.alias
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
    return statuses, reasons
