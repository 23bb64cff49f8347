"""Bring your own predictions: make a user's run and model version a member of an auditable population.

:func:`log_member` is the Python API (``compbias.log_member``), used inside
the user's own ``mlflow.start_run()``; ``compbias register`` (the CLI) calls
it.  Both write exactly what :mod:`compbias.contract` defines, so that
``compbias audit`` audits the version like one a study registered
(docs/contract.md, docs/bring-your-own.md).

Everything that can be checked is checked before anything is written: the
member's tags (:class:`compbias.contract.Member`), the predictions table
(:func:`compbias.contract.validate_predictions`), the classes and groups
(:class:`compbias.contract.MemberInfo`), the model URI, and the population:
a compressed member's baseline must be a registered baseline version of the
same study and seed, and every member must predict the same examples with
the same labels and groups as the population's first baseline
(:func:`compbias.contract.validate_population`).  Then, in order: the
predictions (parquet and its CSV twin) and ``member.json`` in one upload, the
member tags on the run, and the registered version with the same tags.  If a
write fails, the version is deleted, the member tags are taken off the run (a
run this function started ends FAILED), so no version is left without its
predictions; the error is a :class:`compbias.contract.ContractError`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from compbias import contract as C

__all__ = ["RegisteredMember", "log_member", "read_predictions"]

log = logging.getLogger("compbias.register")


@dataclass(frozen=True)
class RegisteredMember:
    """What :func:`log_member` wrote.

    Attributes
    ----------
    registered_model : str
    version : str
        The new registered model version.
    run_id : str
        The run holding ``predictions.parquet`` and ``member.json``.
    member : compbias.contract.Member
    info : compbias.contract.MemberInfo
    """

    registered_model: str
    version: str
    run_id: str
    member: C.Member
    info: C.MemberInfo


def read_predictions(path: str | os.PathLike) -> pd.DataFrame:
    """Read a predictions table from a ``.parquet`` or ``.csv`` file.

    Parameters
    ----------
    path : path-like

    Returns
    -------
    pandas.DataFrame

    Raises
    ------
    ContractError
        Missing file, another extension, or an unreadable file.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise C.ContractError(f"no predictions file {str(p)!r}; give the path of a .parquet or .csv table")
    suffix = p.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(p)
        if suffix == ".csv":
            return pd.read_csv(p)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise C.ContractError(f"cannot read {str(p)!r} as a {suffix[1:]} table: {first}") from None
    raise C.ContractError(f"predictions file {str(p)!r} must end in .parquet or .csv")


def _client(client=None):
    """The given client, else an explicit one of MLflow's current URIs (the user's ``mlflow.set_tracking_uri``
    or ``MLFLOW_TRACKING_URI``: read, never set)."""
    from mlflow.tracking import MlflowClient

    if client is not None:
        return client
    import mlflow

    uri = mlflow.get_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=mlflow.get_registry_uri() or uri)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _versions(client, name: str) -> list:
    """The compbias member versions of a registered model (empty when it does not exist)."""
    from compbias.platform.audit.selection import list_versions

    try:
        client.get_registered_model(name)
    except Exception:
        return []
    return list_versions(client, registered_model=name)


def _fetch_reference(client, record) -> tuple[pd.DataFrame, C.MemberInfo | None]:
    """The predictions and ``member.json`` of a registered member (the population's reference)."""
    from compbias.platform.audit.fetch import ArtifactFetcher

    fetcher = ArtifactFetcher(client, cache_dir=None, workers=1)
    fetched = fetcher.predictions(record)
    if not fetched.ok:
        raise C.ContractError(
            f"the population's reference, version {record.version} of {record.name}, has no usable predictions "
            f"({fetched.error}); repair or delete that version first"
        )
    info, problem = fetcher.member_info([record])
    if problem:
        raise C.ContractError(f"version {record.version} of {record.name}: {problem}")
    return fetched.predictions, info


def _resolve_model_uri(client, model_uri: str) -> tuple[str, str | None]:
    """``(source, model_id)`` of the model a version is registered from; ContractError when it cannot be found."""
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    uri = str(model_uri)
    what = f"model_uri {uri!r}"
    try:
        if RunsArtifactRepository.is_runs_uri(uri):
            rid, path = RunsArtifactRepository.parse_runs_uri(uri)
            path = (path or "").strip("/")
            names = {Path(a.path).name for a in client.list_artifacts(rid, path)} if path else set()
            if "MLmodel" in names:
                return f"{client.get_run(rid).info.artifact_uri.rstrip('/')}/{path}", None
            run = client.get_run(rid)
            found = client.search_logged_models(
                experiment_ids=[run.info.experiment_id],
                filter_string=f"source_run_id = '{rid}' AND name = '{path}'",
            )
            if not found:
                raise C.ContractError(f"{what}: run {rid} has no model at {path!r} (no MLmodel there, no logged model of that name)")
            model_id = found[0].model_id
            return f"models:/{model_id}", model_id
        if uri.startswith("models:/m-"):
            model_id = uri[len("models:/"):].strip("/")
            client.get_logged_model(model_id)
            return uri, model_id
        if uri.startswith("models:/"):
            parts = uri[len("models:/"):].strip("/").split("/")
            if len(parts) != 2:
                raise C.ContractError(f"{what}: write models:/<model_id> or models:/<registered model>/<version>")
            client.get_model_version(parts[0], parts[1])
            return uri, None
    except C.ContractError:
        raise
    except Exception as exc:
        raise C.ContractError(f"{what} cannot be reached: {_short(exc)}; log the model first or leave model_uri out") from None
    return uri, None


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _quoted(text: str) -> str:
    """``text`` inside a single-quoted MLflow filter string."""
    return str(text).replace("\\", "\\\\").replace("'", "\\'")


def _member_name(m: C.Member) -> str:
    return f"study {m.study!r} {m.role} seed {m.seed}" + ("" if m.role == C.ROLE_BASELINE else f" {m.method}@{m.level}")


def log_member(
    predictions: pd.DataFrame | str | os.PathLike,
    *,
    study: str,
    role: str,
    seed: int,
    method: str = C.BASELINE_METHOD,
    level: str = C.BASELINE_LEVEL,
    baseline_version: str | int | None = None,
    baseline_run_id: str | None = None,
    registered_model_name: str,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    positive_class: int | str | None = None,
    groups: Sequence[str] | None = None,
    model_uri: str | None = None,
    run_id: str | None = None,
    experiment: str | None = None,
    client=None,
) -> RegisteredMember:
    """Log a predictions table as a member of an auditable population and register its version.

    Inside ``with mlflow.start_run():`` the active run receives the
    predictions and tags; without an active run (and no ``run_id``) a run is
    started in ``experiment`` and ended FINISHED (FAILED on error).

    Parameters
    ----------
    predictions : pandas.DataFrame or path
        One row per test example: ``example_id``, ``label``, ``pred``
        (integer class ids), optionally ``prob`` and group columns; or the
        path of such a table (``.parquet`` / ``.csv``).
    study : str
        The population's name; members of one study in one registered model
        are audited together.
    role : {"baseline", "compressed"}
    seed : int
        The training seed (of the baseline, for a compressed member).
    method, level : str
        Compression method and level of a compressed member (e.g.
        ``"magnitude"``, ``"0.9"``); leave the defaults for a baseline.
    baseline_version : str or int, optional
        A compressed member's baseline: its version in ``registered_model_name``.
    baseline_run_id : str, optional
        Or the baseline's run id (one of the two is required for compressed members).
    registered_model_name : str
        Created for the first baseline when missing.
    num_classes : int, optional
        Default: the baseline's ``member.json`` for a compressed member, else
        ``len(class_names)``, else one more than the largest label or prediction.
    class_names : sequence of str, optional
        One name per class id.
    positive_class : int or str, optional
        Class id or name whose FPR/FNR the group rates report (binary tasks).
    groups : sequence of str, optional
        Group columns of the table (default: the baseline's, else every
        integer or boolean column besides the required ones and ``prob``).
    model_uri : str, optional
        The user's logged model (``runs:/<run>/<path>``, ``models:/<model_id>``);
        the version is registered from it.  Default: the run's artifact root.
    run_id : str, optional
        Attach to this existing run instead of the active one.
    experiment : str, optional
        Experiment of a run started here; default ``compbias/<study>``.
    client : mlflow.tracking.MlflowClient, optional
        Default: a client of MLflow's current tracking and registry URIs.

    Returns
    -------
    RegisteredMember

    Raises
    ------
    ContractError
        Any bad input (the message names it and what to do); nothing is left
        half-written.

    Examples
    --------
    >>> import mlflow, compbias                                  # doctest: +SKIP
    >>> with mlflow.start_run():                                 # doctest: +SKIP
    ...     compbias.log_member(frame, study="tab", role="baseline", seed=0,
    ...                         registered_model_name="tab-mlp")
    """
    import mlflow

    client = _client(client)
    # --- 1. everything that can be checked, before anything is written ------------------------
    frame = read_predictions(predictions) if isinstance(predictions, (str, os.PathLike)) else predictions
    name = str(registered_model_name or "").strip()
    if not name:
        raise C.ContractError("registered_model_name is required: the registered model the version is added to")
    member = C.Member(
        study=study, role=role, seed=seed, method=method, level=level,
        baseline_version=str(baseline_version) if baseline_version not in (None, "") else None,
        baseline_run_id=baseline_run_id or None,
    )
    where = f"predictions of {_member_name(member)}"
    existing = _versions(client, name)
    same_study = [r for r in existing if r.study == member.study]
    for r in same_study:
        same_model = r.population == member.population or member.role == C.ROLE_BASELINE
        if r.role == member.role and str(r.seed) == str(member.seed) and same_model:
            raise C.ContractError(
                f"{_member_name(member)} is already version {r.version} of {name}; a member is registered once "
                "(delete that version first, or give this one another seed, method or level)"
            )
    reference = None  # (record, predictions, member.json) the new member must agree with
    if member.role == C.ROLE_COMPRESSED:
        base = None
        if member.baseline_version:
            base = next((r for r in existing if r.version == member.baseline_version), None)
            if base is None:
                raise C.ContractError(
                    f"the baseline version {member.baseline_version} of registered model {name!r} does not exist; "
                    "register the baseline first (role baseline) and pass the version number it got"
                )
        if member.baseline_run_id:
            by_run = next((r for r in existing if r.run_id == member.baseline_run_id), None)
            if by_run is None:
                raise C.ContractError(
                    f"no version of registered model {name!r} comes from the baseline run {member.baseline_run_id}; "
                    "register the baseline first (role baseline) in the same registered model"
                )
            if base is not None and base.version != by_run.version:
                raise C.ContractError(
                    f"baseline_version {base.version} and baseline_run_id {member.baseline_run_id} (version "
                    f"{by_run.version}) name different versions; give one of them"
                )
            base = by_run
        if base.role != C.ROLE_BASELINE or base.study != member.study:
            raise C.ContractError(
                f"version {base.version} of {name!r} is not a baseline of study {member.study!r} (it is a "
                f"{base.role} of study {base.study!r}); a compressed member's baseline must be one"
            )
        if str(base.seed) != str(member.seed):
            raise C.ContractError(
                f"the baseline version {base.version} has seed {base.seed}, this member seed {member.seed}; "
                "a compressed member carries its baseline's seed"
            )
        member = C.Member(
            study=member.study, role=member.role, seed=member.seed, method=member.method, level=member.level,
            baseline_version=base.version, baseline_run_id=base.run_id or member.baseline_run_id,
        )
        reference = base
    else:
        baselines = sorted((r for r in same_study if r.is_baseline), key=lambda r: int(r.version))
        reference = baselines[0] if baselines else None
    ref_frame, ref_info = (None, None)
    if reference is not None:
        ref_frame, ref_info = _fetch_reference(client, reference)
    if num_classes is not None:
        C.MemberInfo(num_classes=num_classes)  # a bad value is refused by name before it is compared
    if ref_info is not None:  # the population's facts are the default, and must not be contradicted
        if num_classes is not None and int(num_classes) != ref_info.num_classes:
            raise C.ContractError(
                f"num_classes {num_classes} differs from the population's {ref_info.num_classes} "
                f"(version {reference.version}'s {C.MEMBER_FILE}); members of a study share their classes: "
                "leave num_classes out to take the population's"
            )
        num_classes = ref_info.num_classes if num_classes is None else num_classes
        class_names = ref_info.class_names if class_names is None else class_names
        positive_class = ref_info.positive_class if positive_class is None else positive_class
        groups = ref_info.groups if groups is None else groups
    if groups is not None:
        groups = [str(g) for g in groups]
    checked = C.validate_predictions(frame, groups=groups, where=where)
    if num_classes is None:
        num_classes = len(class_names) if class_names is not None else max(2, int(max(checked[C.LABEL].max(), checked[C.PRED].max())) + 1)
    info = C.MemberInfo(
        num_classes=num_classes, class_names=class_names, positive_class=positive_class,
        groups=groups if groups is not None else C.group_columns(checked),
    )
    if ref_info is not None:
        for what in ("num_classes", "class_names", "positive_class", "groups"):
            mine, theirs = getattr(info, what), getattr(ref_info, what)
            if theirs is not None and mine != theirs:
                raise C.ContractError(
                    f"{what} {_plain(mine)} differs from the population's {_plain(theirs)} (version "
                    f"{reference.version}'s {C.MEMBER_FILE}); members of a study share their classes and groups: "
                    f"leave {what} out to take the population's"
                )
    checked = C.validate_predictions(checked, num_classes=info.num_classes, groups=info.groups, where=where)
    if ref_frame is not None:
        C.validate_population(
            {f"the population's baseline (version {reference.version} of {name})": ref_frame, "these predictions": checked},
            groups=info.groups,
        )
    source, model_id = (None, None)
    if model_uri:
        source, model_id = _resolve_model_uri(client, model_uri)

    active = mlflow.active_run()  # fluent by design: the user's own ``with mlflow.start_run():`` (read, not started)
    started = False
    if run_id:
        try:
            run = client.get_run(run_id)
        except Exception as exc:
            raise C.ContractError(f"run {run_id} cannot be used: {_short(exc)}; give the id of an existing run") from None
        if run.info.lifecycle_stage == "deleted":
            raise C.ContractError(f"run {run_id} is deleted; restore it or give another run")
    elif active is not None:
        run = client.get_run(active.info.run_id)
    else:
        run = None
    if run is not None:
        tags = run.data.tags
        if tags.get(C.STUDY) or tags.get(C.ROLE):
            raise C.ContractError(
                f"run {run.info.run_id} already carries member tags ({C.STUDY}={tags.get(C.STUDY)!r}, "
                f"{C.ROLE}={tags.get(C.ROLE)!r}); one run holds one member: start a new run"
            )

    # --- 2. the writes: artifacts, run tags, version --------------------------------------------
    from mlflow.entities import RunTag

    if run is None:
        from compbias.platform.tracking import ensure_experiment

        exp_id = ensure_experiment(client, experiment or f"compbias/{member.study}")
        run = client.create_run(exp_id, run_name=_member_name(member).replace("'", ""), tags={C.RUN_KIND: C.RUN_KIND_MODEL})
        started = True
    rid = run.info.run_id
    tags = member.tags()
    version = None
    tagged = False
    try:
        with tempfile.TemporaryDirectory(prefix="compbias-register-") as tmp:
            out = Path(tmp)
            checked.to_parquet(out / C.PREDICTIONS, index=False)
            checked.to_csv(out / (C.PREDICTIONS.removesuffix(".parquet") + ".csv"), index=False)
            (out / C.MEMBER_FILE).write_text(info.to_json())
            client.log_artifacts(rid, str(out))  # one upload
        client.log_batch(rid, tags=[RunTag(k, v) for k, v in tags.items()])
        tagged = True
        try:
            client.get_registered_model(name)
        except Exception:
            try:
                client.create_registered_model(name, tags={C.STUDY: member.study})
            except Exception:
                client.get_registered_model(name)  # created concurrently
        from compbias.platform.tracking import scoped_tracking_uri

        with scoped_tracking_uri(client):  # a SQL registry resolves a models:/<model_id> source with the process URI
            mv = client.create_model_version(
                name, source=source or run.info.artifact_uri, run_id=rid, tags=tags, await_creation_for=60, model_id=model_id
            )
        version = str(mv.version)
        if started:
            client.set_terminated(rid, "FINISHED")
    except BaseException as exc:
        doomed = {version} if version is not None else set()
        if tagged:  # a version created by a call that then failed (e.g. timed out waiting for it) is ours too
            try:
                doomed |= {str(v.version) for v in client.search_model_versions(f"name = '{_quoted(name)}' and run_id = '{rid}'")
                           if (v.tags or {}).get(C.STUDY) == member.study and (v.tags or {}).get(C.SOURCE) == member.source}
            except Exception:  # pragma: no cover - the store itself is gone
                log.exception("could not look for versions of run %s", rid)
        for v in sorted(doomed):
            try:
                client.delete_model_version(name, v)
            except Exception:  # pragma: no cover - the store itself is gone
                log.exception("could not delete version %s of %s", v, name)
        try:
            if tagged:
                for k in tags:  # the run is no member any more
                    client.delete_tag(rid, k)
            client.set_tag(rid, C.ERROR, f"compbias register: {type(exc).__name__}: {exc}"[:5000])
            if started:
                client.set_terminated(rid, "FAILED")
        except Exception:  # pragma: no cover
            log.exception("could not clean up run %s", rid)
        if isinstance(exc, C.ContractError) or not isinstance(exc, Exception):
            raise
        raise C.ContractError(
            f"registering {_member_name(member)} in {name!r} failed while writing ({_short(exc)}); nothing was kept: "
            "fix the tracking store and run it again"
        ) from exc
    return RegisteredMember(registered_model=name, version=version, run_id=rid, member=member, info=info)
