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
from compbias.platform.register_checks import (
    check_predictions,
    find_reference,
    first_line,
    member_name,
    member_versions,
    refuse_duplicate,
    resolve_model_uri,
)

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


def _quoted(text: str) -> str:
    """``text`` inside a single-quoted MLflow filter string."""
    return str(text).replace("\\", "\\\\").replace("'", "\\'")


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
    existing = member_versions(client, name)
    refuse_duplicate(member, existing, name)
    member, reference = find_reference(member, existing, name)
    checked, info = check_predictions(
        client, frame, reference, name, num_classes=num_classes, class_names=class_names,
        positive_class=positive_class, groups=groups, where=f"predictions of {member_name(member)}",
    )
    source, model_id = resolve_model_uri(client, model_uri) if model_uri else (None, None)

    active = mlflow.active_run()  # fluent by design: the user's own ``with mlflow.start_run():`` (read, not started)
    started = False
    if run_id:
        try:
            run = client.get_run(run_id)
        except Exception as exc:
            raise C.ContractError(f"run {run_id} cannot be used: {first_line(exc)}; give the id of an existing run") from None
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
        run = client.create_run(exp_id, run_name=member_name(member).replace("'", ""), tags={C.RUN_KIND: C.RUN_KIND_MODEL})
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
            f"registering {member_name(member)} in {name!r} failed while writing ({first_line(exc)}); nothing was kept: "
            "fix the tracking store and run it again"
        ) from exc
    return RegisteredMember(registered_model=name, version=version, run_id=rid, member=member, info=info)
