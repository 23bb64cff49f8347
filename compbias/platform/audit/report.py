"""The self-contained HTML report of an audit (figures embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
import json
import math

import pandas as pd

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
.pass{color:#176117;font-weight:bold}.fail{color:#a01818;font-weight:bold}.error{color:#8a5a00;font-weight:bold}
img{max-width:100%;border:1px solid #eee}.note{color:#555;font-size:13px}
"""


def table_html(frame: pd.DataFrame, *, max_rows: int = 200, float_format: str = "{:.4g}") -> str:
    """Render a table as HTML (first ``max_rows`` rows).

    Parameters
    ----------
    frame : pandas.DataFrame
    max_rows : int
    float_format : str

    Returns
    -------
    str
    """
    if frame is None or frame.empty:
        return "<p class='note'>(empty)</p>"
    shown = frame.head(max_rows)
    text = shown.to_html(index=False, na_rep="", float_format=lambda v: float_format.format(v), border=0, escape=True)
    for s in ("pass", "fail", "error"):
        text = text.replace(f"<td>{s}</td>", f"<td class='{s}'>{s}</td>")
    if len(frame) > max_rows:
        text += f"<p class='note'>{len(frame) - max_rows} more rows in the parquet table.</p>"
    return text


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    return html.escape(str(v))


def render_report(
    *,
    title: str,
    summary: dict,
    settings: dict,
    tables: dict[str, pd.DataFrame],
    figures: dict[str, bytes],
    notes: list[str],
    run_info: dict,
) -> str:
    """Build the audit report.

    Parameters
    ----------
    title : str
    summary : dict
        Headline numbers.
    settings : dict
        Thresholds and options used.
    tables : dict of str to pandas.DataFrame
    figures : dict of str to bytes
        PNG images by name, embedded in that order.
    notes : list of str
        Caveats (skipped similarity, gallery unavailable...).
    run_info : dict
        Run id, study, registered model, metrics version.

    Returns
    -------
    str
        One HTML document with no external references.
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"]
    parts.append(f"<h1>{html.escape(title)}</h1>")
    parts.append("<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in run_info.items()) + "</table>")
    parts.append("<h2>Summary</h2>")
    worst = summary.get("worst_cev")
    lines = [f"Baseline population accuracy: <b>{_fmt(summary.get('baseline_acc', float('nan')))}</b>."]
    if worst:
        lines.append(f"Largest CEV: <b>{_fmt(worst['cev'])}</b> (SDE {_fmt(worst['sde'])}, accuracy {_fmt(worst['acc'])}) for <b>{html.escape(worst['population'])}</b>.")
    if summary.get("cie"):
        c = summary["cie"]
        lines.append(f"On its top-1% CIE set the compressed population is {_fmt(c['comp_acc'])} accurate against {_fmt(c['base_acc'])} for the baselines.")
    wg = summary.get("worst_group")
    if wg:
        lines.append(f"Worst group: <b>{html.escape(str(wg['group']))}</b>, FPR change {_fmt(wg['fpr_change'])}% under {html.escape(wg['population'])}.")
    parts.append("<p>" + " ".join(lines) + "</p>")
    if "versions" in tables:
        parts.append("<h2>Verdict per audited version</h2>" + table_html(tables["versions"]))
    if "gate" in tables and not tables["gate"].empty and not any(v is not None for v in (settings.get("thresholds") or {}).values()):
        gate = tables["gate"]
        parts.append("<h2>Default gate: excess harm per class and group (pp; a row fails when its interval lies above the "
                     "tolerance)</h2>" + table_html(gate.sort_values("excess_ci_low", ascending=False, na_position="last")))
    parts.append("<h2>Settings</h2><pre>" + html.escape(json.dumps(settings, indent=1, default=str)) + "</pre>")
    captions = {
        "class_changes": "Per-class normalised change of FPR and FNR (Blakeney et al., Fig. 3)",
        "level_curves": "Accuracy, PIE, CEV and SDE against level (Blakeney et al., Fig. 2)",
        "group_changes": "Group FPR/FNR change against the baseline population (Hooker et al. 2020)",
        "cev_vs_svcca": "CEV against SVCCA distance (Blakeney et al., Fig. 5)",
    }
    for name, png in figures.items():
        cap = captions.get(name) or ("Top CIE examples: " + name.replace("gallery_", "").replace("__", "/") if name.startswith("gallery_") else name)
        b64 = base64.b64encode(png).decode("ascii")
        parts.append(f"<h2>{html.escape(cap)}</h2><img alt='{html.escape(name)}' src='data:image/png;base64,{b64}'>")
    order = ["bias", "models", "cie", "cie_composition", "ttest", "similarity", "rates", "cie_list"]
    titles = {
        "bias": "Populations: accuracy, CEV, SDE (95% CI), PIE, worst group",
        "models": "Per model",
        "cie": "CIE sets: accuracy on and off the set",
        "cie_composition": "Group composition of the CIE sets against the test set",
        "ttest": "Welch's t-test per class (recall), baseline vs compressed",
        "similarity": "SVCCA and linear CKA against the baseline",
        "rates": "Rates and their normalised change, with bootstrap CIs",
        "cie_list": "CIE examples (also cie.csv for annotation)",
    }
    for name in order:
        if name in tables and not tables[name].empty:
            parts.append(f"<h2>{html.escape(titles[name])}</h2>" + table_html(tables[name]))
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
