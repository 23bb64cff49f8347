"""What ``compbias audit`` prints: an audit's headline numbers, and the latest audit when nothing is new."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from compbias.platform.audit.service import AuditResult

__all__ = ["latest_audit", "print_summary"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def print_summary(result: AuditResult, stream=None) -> None:
    """Print an audit's headline numbers and where its report is.

    Parameters
    ----------
    result : AuditResult
    stream : file, optional
        Default stdout.
    """
    out = stream or sys.stdout
    s = result.summary
    counts = {k: list(result.statuses.values()).count(k) for k in ("pass", "fail", "error")}
    print(f"audit of study {result.study} ({result.registered_model}): run {result.run_id}", file=out)
    print(f"  versions: {counts['pass']} pass, {counts['fail']} fail, {counts['error']} error", file=out)
    if "baseline_acc" in s:
        print(f"  baseline accuracy: {_fmt(s['baseline_acc'])}", file=out)
    for p in s.get("populations", []):
        print(f"  {p['method']:>22s} @ {str(p['level']):<12s} acc {_fmt(p['acc'])}  CEV {_fmt(p['cev'])}  SDE {_fmt(p['sde'])}  "
              f"PIE {p.get('pie')}  worst group {p.get('worst_group')} ({_fmt(p.get('worst_group_fpr_change'))}% FPR)", file=out)
    if s.get("cie"):
        c = s["cie"]
        print(f"  CIE top-1% accuracy ({c['population']}): compressed {_fmt(c['comp_acc'])} vs baseline {_fmt(c['base_acc'])}", file=out)
    if s.get("worst_group"):
        w = s["worst_group"]
        print(f"  worst group: {w['group']} (FPR change {_fmt(w['fpr_change'])}% under {w['population']})", file=out)
    for key, reason in sorted(result.reasons.items()):
        status = result.statuses.get(key)
        if status in ("fail", "error"):
            print(f"  {status:5s} {key}: {reason}", file=out)
    if result.alias_version:
        print(f"  alias -> version {result.alias_version}", file=out)
    if result.report_path:
        print(f"  report: {result.report_path}", file=out)


def latest_audit(client, study: str | None = None) -> AuditResult | None:
    """The most recent finished audit run (of a study), rebuilt from its ``summary.json``.

    Parameters
    ----------
    client : MlflowClient
    study : str, optional

    Returns
    -------
    AuditResult or None
    """
    from compbias.platform.audit import tags as T
    from compbias.platform.audit.service import AuditResult
    from compbias.platform.audit.writer import local_dir

    flt = f"tags.`{T.RUN_KIND}` = '{T.RUN_KIND_AUDIT}' and attributes.status = 'FINISHED'"
    if study:
        flt += f" and tags.`{T.STUDY}` = '{study}'"
    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return None
    runs = client.search_runs(exps, filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run = runs[0]
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as tmp:
            doc = json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json", tmp)).read_text())
    except Exception:
        return None
    local = local_dir(run.info.artifact_uri)
    report = local / "report.html" if local is not None and (local / "report.html").is_file() else None
    versions = doc.get("versions", {})
    return AuditResult(
        run_id=run.info.run_id, registered_model=doc.get("registered_model", ""), study=doc.get("study", ""),
        statuses={k: v["status"] for k, v in versions.items()},
        reasons={k: v["reason"] for k, v in versions.items() if v.get("reason") and v["status"] != "pass"},
        summary=doc.get("summary", {}), report_path=str(report) if report else None,
    )
