"""What ``compbias register`` checks before it writes anything: a new member against its population.

:func:`compbias.platform.register.log_member` calls these in order: the
member is not registered yet (:func:`refuse_duplicate`), a compressed
member's baseline is a registered baseline of the same study and seed
(:func:`find_reference`), its predictions, classes and groups agree with the
population's reference version (:func:`check_predictions`), and the model URI
it is registered from can be reached (:func:`resolve_model_uri`).  Every
problem is a :class:`compbias.contract.ContractError` naming it and what to
do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from compbias import contract as C

__all__ = [
    "first_line", "member_name", "member_versions", "refuse_duplicate", "find_reference", "fetch_reference",
    "check_predictions", "resolve_model_uri",
]


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type when it has none), at most 300 characters."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def member_name(m: C.Member) -> str:
    """``study 'tab' compressed seed 0 magnitude@0.9``: a member as error messages and run names name it."""
    return f"study {m.study!r} {m.role} seed {m.seed}" + ("" if m.role == C.ROLE_BASELINE else f" {m.method}@{m.level}")


def member_versions(client, name: str) -> list:
    """The compbias member versions of a registered model (empty when it does not exist).

    Returns
    -------
    list of compbias.platform.audit.selection.VersionRecord
    """
    from compbias.platform.audit.selection import list_versions

    try:
        client.get_registered_model(name)
    except Exception:
        return []
    return list_versions(client, registered_model=name)


def refuse_duplicate(member: C.Member, existing: Sequence, name: str) -> None:
    """Refuse a member that ``name`` already holds (same study, role, seed and, when compressed, method and level).

    Raises
    ------
    ContractError
        Naming the version that already is this member.
    """
    for r in existing:
        same_model = r.population == member.population or member.role == C.ROLE_BASELINE
        if r.study == member.study and r.role == member.role and str(r.seed) == str(member.seed) and same_model:
            raise C.ContractError(
                f"{member_name(member)} is already version {r.version} of {name}; a member is registered once "
                "(delete that version first, or give this one another seed, method or level)"
            )


def _version_of(existing: Sequence, attr: str, value: str, name: str, missing: str):
    """The version of ``existing`` whose ``attr`` is ``value``; ContractError ``missing`` when there is none."""
    found = next((r for r in existing if getattr(r, attr) == value), None)
    if found is None:
        raise C.ContractError(missing.format(value=value, name=name))
    return found


def find_reference(member: C.Member, existing: Sequence, name: str) -> tuple[C.Member, object | None]:
    """The version a new member must agree with, and the member completed with its baseline's lineage.

    Parameters
    ----------
    member : compbias.contract.Member
    existing : sequence of VersionRecord
        The member versions of ``name`` (:func:`member_versions`).
    name : str
        The registered model.

    Returns
    -------
    member : compbias.contract.Member
        A compressed member gets both its baseline's version and run id.
    reference : VersionRecord or None
        A compressed member's baseline; for a baseline, the study's first
        registered baseline (None for the first one).

    Raises
    ------
    ContractError
        The baseline version or run is missing, the two name different
        versions, or the baseline is no baseline of this study and seed.
    """
    if member.role != C.ROLE_COMPRESSED:
        baselines = sorted((r for r in existing if r.study == member.study and r.is_baseline), key=lambda r: int(r.version))
        return member, (baselines[0] if baselines else None)
    base = None
    if member.baseline_version:
        base = _version_of(existing, "version", member.baseline_version, name,
                           "the baseline version {value} of registered model {name!r} does not exist; "
                           "register the baseline first (role baseline) and pass the version number it got")
    if member.baseline_run_id:
        by_run = _version_of(existing, "run_id", member.baseline_run_id, name,
                             "no version of registered model {name!r} comes from the baseline run {value}; "
                             "register the baseline first (role baseline) in the same registered model")
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
    return member, base


def fetch_reference(client, record) -> tuple[pd.DataFrame, C.MemberInfo | None]:
    """The predictions and ``member.json`` of a registered member (the population's reference).

    Raises
    ------
    ContractError
        The version has no usable predictions or a broken ``member.json``.
    """
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


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def check_predictions(
    client,
    frame: pd.DataFrame,
    reference,
    name: str,
    *,
    num_classes: int | None,
    class_names: Sequence[str] | None,
    positive_class: int | str | None,
    groups: Sequence[str] | None,
    where: str,
) -> tuple[pd.DataFrame, C.MemberInfo]:
    """Validate a new member's predictions and complete its ``member.json`` from the population's.

    The reference version's ``member.json`` supplies every fact left out and
    must not be contradicted; its predictions must cover the same examples
    with the same labels and groups (:func:`compbias.contract.validate_population`).

    Parameters
    ----------
    client : mlflow.tracking.MlflowClient
    frame : pandas.DataFrame
        The predictions as given.
    reference : VersionRecord or None
        From :func:`find_reference`.
    name : str
        The registered model (named in messages).
    num_classes, class_names, positive_class, groups
        As given to :func:`compbias.log_member` (None: the population's, else inferred).
    where : str
        Named in messages about the table.

    Returns
    -------
    checked : pandas.DataFrame
        The predictions sorted by ``example_id``.
    info : compbias.contract.MemberInfo

    Raises
    ------
    ContractError
    """
    ref_frame, ref_info = fetch_reference(client, reference) if reference is not None else (None, None)
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
    return checked, info


def resolve_model_uri(client, model_uri: str) -> tuple[str, str | None]:
    """``(source, model_id)`` of the model a version is registered from.

    Parameters
    ----------
    client : mlflow.tracking.MlflowClient
    model_uri : str
        ``runs:/<run>/<path>``, ``models:/<model_id>`` or ``models:/<name>/<version>``.

    Returns
    -------
    source : str
    model_id : str or None
        The logged model's id when the URI names one.

    Raises
    ------
    ContractError
        The model cannot be found or reached.
    """
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
        raise C.ContractError(f"{what} cannot be reached: {first_line(exc)}; log the model first or leave model_uri out") from None
    return uri, None
