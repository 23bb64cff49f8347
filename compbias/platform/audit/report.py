"""The self-contained HTML report of an audit (figures embedded as base64 PNG).

One file a reviewer reads from the top: the verdict per version (counts, then
each failing population with its reason), the three largest harms to a class
or group with their intervals, the key numbers, a contents list, then every
figure and table in a collapsible ``<details>`` section. Tables sort by a
click on a column header (a small inline script); nothing is fetched from the
network (no external scripts, styles, fonts or images).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re

import pandas as pd

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin:0}h3{font-size:1em}
section.head{margin:1em 0 1.2em}section.head>h2{border-bottom:1px solid #ddd;margin-bottom:.4em}
.meta{color:#555;font-size:13px;margin-top:0}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:hover{background:#e4e4e4}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
.pass{color:#176117;font-weight:bold}.fail{color:#a01818;font-weight:bold}.error{color:#8a5a00;font-weight:bold}
.counts span{margin-right:1.2em}.reason{font-size:13px;color:#333}
ul.failing li{margin:.3em 0}
table.harms td,table.harms th{text-align:left}
img{max-width:100%;border:1px solid #eee}.note{color:#555;font-size:13px}
nav#contents ol{columns:2;font-size:14px}
details{margin:.6em 0;border-top:1px solid #ddd;padding-top:.3em}
details>summary{cursor:pointer;padding:.2em 0}details>summary>h2{display:inline}
"""

SCRIPT = """
(function(){
  function cellKey(td){
    var s = td ? td.textContent.trim() : '';
    if (s === '' || s === 'n/a') return {empty: true};
    var n = Number(s.replace(/\\u2212/g, '-').replace(/,/g, ''));
    return isNaN(n) ? {text: s} : {num: n};
  }
  function compare(a, b){
    if (a.empty || b.empty) return a.empty && b.empty ? 0 : (a.empty ? 1 : -1);
    if ('num' in a && 'num' in b) return a.num - b.num;
    return String('num' in a ? a.num : a.text).localeCompare(String('num' in b ? b.num : b.text), undefined, {numeric: true});
  }
  function sortBy(table, col, th){
    var body = table.tBodies[0];
    var dir = th.getAttribute('aria-sort') === 'ascending' ? -1 : 1;
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function(r1, r2){
      var a = cellKey(r1.cells[col]), b = cellKey(r2.cells[col]);
      if (a.empty || b.empty) return compare(a, b);  // empty cells last either way
      return dir * compare(a, b);
    });
    rows.forEach(function(r){ body.appendChild(r); });
    Array.prototype.forEach.call(th.parentNode.cells, function(h){ h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', dir === 1 ? 'ascending' : 'descending');
  }
  document.querySelectorAll('table.sortable').forEach(function(table){
    if (!table.tHead || !table.tBodies.length) return;
    var head = table.tHead.rows[table.tHead.rows.length - 1];
    Array.prototype.forEach.call(head.cells, function(th, col){
      th.tabIndex = 0;
      th.title = 'sort by this column';
      th.addEventListener('click', function(){ sortBy(table, col, th); });
      th.addEventListener('keydown', function(e){ if (e.key === 'Enter') sortBy(table, col, th); });
    });
  });
  function reveal(id){
    var el = id && document.getElementById(id);
    for (var p = el; p; p = p.parentElement) if (p.tagName === 'DETAILS') p.open = true;
    return el;
  }
  document.querySelectorAll('a[href^="#"]').forEach(function(a){
    a.addEventListener('click', function(){ reveal(decodeURIComponent(a.getAttribute('href').slice(1))); });
  });
  if (location.hash) { var el = reveal(decodeURIComponent(location.hash.slice(1))); if (el) el.scrollIntoView(); }
})();
"""

HARMS_SHOWN = 3


def table_html(frame: pd.DataFrame, *, max_rows: int = 200, float_format: str = "{:.4g}", sortable: bool = False,
               table_id: str | None = None) -> str:
    """Render a table as HTML (first ``max_rows`` rows).

    Parameters
    ----------
    frame : pandas.DataFrame
    max_rows : int
    float_format : str
    sortable : bool
        Mark the table ``sortable`` (the report's script sorts it by a
        click on a column header).
    table_id : str, optional
        The ``id`` of the ``<table>`` element.

    Returns
    -------
    str
    """
    if frame is None or frame.empty:
        return "<p class='note'>(empty)</p>"
    shown = frame.head(max_rows)
    text = shown.to_html(index=False, na_rep="", float_format=lambda v: float_format.format(v), border=0, escape=True,
                         classes="sortable" if sortable else None, table_id=table_id)
    for s in ("pass", "fail", "error"):
        text = text.replace(f"<td>{s}</td>", f"<td class='{s}'>{s}</td>")
    if len(frame) > max_rows:
        text += f"<p class='note'>{len(frame) - max_rows} more rows in the parquet table.</p>"
    return text


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    return html.escape(str(v))


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _pp(v) -> str:
    v = _num(v)
    return "n/a" if not math.isfinite(v) else f"{v:+.1f}"


def _slug(name: str) -> str:
    return "sec-" + re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")


def _pop(method, level) -> str:
    return f"{method}/{level}"


def verdict_html(versions: pd.DataFrame | None) -> str:
    """The verdict, compact: counts of pass/fail/error, then each failing or erroring
    population (or version) once, with how many of its versions and the reason."""
    if versions is None or versions.empty:
        return "<p class='note'>No version was audited.</p>"
    v = versions.copy()
    role = v["role"] if "role" in v else pd.Series(["compressed"] * len(v), index=v.index)
    counts = v["status"].value_counts()
    n_base = int((role == "baseline").sum())
    out = ["<p class='counts'>" + f"<span><b>{len(v)}</b> versions audited:</span>"
           + "".join(f"<span class='{s}'>{int(counts.get(s, 0))} {s}</span>" for s in ("pass", "fail", "error"))
           + (f"<span class='note'>({n_base} baselines: the reference, pass by definition)</span>" if n_base else "")
           + "</p>"]
    bad = v[v["status"].isin(["fail", "error"])]
    if bad.empty:
        out.append("<p>Every compressed version passes.</p>" if (role != "baseline").any() else "")
        return "".join(out)
    items = []
    keys = ["status", "method", "level", "reason"]
    bad = bad.assign(**{k: bad[k].fillna("") for k in keys if k in bad})
    for (status, method, level, reason), part in bad.groupby([k for k in keys], sort=False, dropna=False):
        names = ", ".join(html.escape(str(x)) for x in part["version"])
        where = _pop(method, level) if method else "version"
        items.append((0 if status == "fail" else 1, where,
                      f"<li><span class='{status}'>{status}</span> <b>{html.escape(where)}</b> "
                      f"({len(part)} version{'s' if len(part) != 1 else ''}: {names})<br>"
                      f"<span class='reason'>{html.escape(str(reason) or 'no reason recorded')}</span></li>"))
    out.append("<ul class='failing'>" + "".join(i[2] for i in sorted(items, key=lambda t: (t[0], t[1]))) + "</ul>")
    return "".join(out)


def largest_harms(tables: dict[str, pd.DataFrame], n: int = HARMS_SHOWN) -> pd.DataFrame:
    """The ``n`` largest harms to a class or group, for the top of the report.

    From the default gate's table when there is one (excess harm in
    percentage points: the cell's error-rate increase minus the overall
    increase, with its two-level bootstrap interval; estimable cells with a
    positive excess, largest first); otherwise from the rates table (each
    group's normalised FPR/FNR change in %, with its bootstrap interval).

    Returns
    -------
    pandas.DataFrame
        ``population``, ``who``, ``n``, ``what``, ``value``, ``ci_low``,
        ``ci_high``, ``unit``, ``significant`` (None when there is no
        tolerance to compare with), at most ``n`` rows.
    """
    gate = tables.get("gate")
    if gate is not None and not gate.empty and "excess_pp" in gate:
        g = gate[(gate["cell"] != "overall") & gate["excess_pp"].map(lambda x: math.isfinite(_num(x)))].copy()
        g["excess_pp"] = g["excess_pp"].map(_num)
        g = g[g["excess_pp"] > 0].sort_values(["excess_pp", "excess_ci_low"], ascending=False).head(n)
        return pd.DataFrame({
            "population": [_pop(m, lv) for m, lv in zip(g["method"], g["level"])],
            "who": [f"{c} {nm}" for c, nm in zip(g["cell"], g["name"])],
            "n": g["n"].astype(int).tolist(),
            "what": [f"error {_pp(e)} pp vs {_pp(o)} pp overall" for e, o in zip(g["error_change_pp"], g["overall_change_pp"])],
            "value": g["excess_pp"].tolist(), "ci_low": g["excess_ci_low"].map(_num).tolist(),
            "ci_high": g["excess_ci_high"].map(_num).tolist(), "unit": "pp excess", "significant": g["fails"].astype(bool).tolist(),
        })
    rates = tables.get("rates")
    if rates is None or rates.empty or "change_pct" not in rates:
        return pd.DataFrame()
    r = rates[(rates["scope"] == "group") & rates["metric"].isin(["fpr", "fnr"]) & (rates["method"] != "baseline")].copy()
    r["change_pct"] = r["change_pct"].map(_num)
    r = r[r["change_pct"].map(math.isfinite) & (r["change_pct"] > 0)].sort_values("change_pct", ascending=False).head(n)
    lo = r["change_ci_low"].map(_num) if "change_ci_low" in r else pd.Series(float("nan"), index=r.index)
    hi = r["change_ci_high"].map(_num) if "change_ci_high" in r else pd.Series(float("nan"), index=r.index)
    return pd.DataFrame({
        "population": [_pop(m, lv) for m, lv in zip(r["method"], r["level"])],
        "who": [f"group {nm}" for nm in r["name"]], "n": [None] * len(r),
        "what": [f"{m.upper()} {_fmt(_num(b))} \u2192 {_fmt(_num(c))}" for m, b, c in zip(r["metric"], r["baseline_mean"], r["mean"])],
        "value": r["change_pct"].tolist(), "ci_low": lo.tolist(), "ci_high": hi.tolist(), "unit": "% change",
        "significant": [None] * len(r),
    })


def harms_html(harms: pd.DataFrame, settings: dict) -> str:
    if harms.empty:
        return "<p>No class or group got worse than the model as a whole.</p>"
    gate = settings.get("gate")
    if isinstance(gate, str):
        try:
            gate = json.loads(gate)
        except ValueError:
            gate = None
    tol = float(gate.get("tolerance_pp", 2.0)) if isinstance(gate, dict) else 2.0
    rows = []
    for h in harms.itertuples(index=False):
        ci = f"[{_pp(h.ci_low)}, {_pp(h.ci_high)}]" if math.isfinite(_num(h.ci_low)) else ""
        sig = ("" if h.significant is None else
               "<span class='fail'>yes</span>" if h.significant else "no")
        rows.append(f"<tr><td>{html.escape(h.population)}</td><td>{html.escape(h.who)}</td>"
                    f"<td>{'' if h.n is None else int(h.n)}</td><td>{html.escape(h.what)}</td>"
                    f"<td><b>{_pp(h.value)}</b> {html.escape(ci)}</td><td>{sig}</td></tr>")
    unit = harms["unit"].iloc[0]
    head = (f"<tr><th>population</th><th>class or group</th><th>n</th><th>error-rate change</th>"
            f"<th>{html.escape(unit)} [95% interval]</th><th>significant (interval above {tol:g} pp)</th></tr>"
            if unit == "pp excess" else
            "<tr><th>population</th><th>group</th><th>n</th><th>rate</th><th>normalised change (%) [95% interval]</th><th></th></tr>")
    note = ("Excess harm: the cell's error-rate increase minus the model's overall increase, in percentage points, "
            "each compressed model against its own baseline; the interval resamples seeds and test examples "
            "(see the Default gate section)." if unit == "pp excess" else
            "Normalised change of the group's rate against the baseline population, with its bootstrap interval.")
    return (f"<table class='harms'><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"
            f"<p class='note'>{html.escape(note)}</p>")


def _key_numbers(summary: dict) -> str:
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
    return "<p>" + " ".join(lines) + "</p>"


CAPTIONS = {
    "class_changes": "Per-class normalised change of FPR and FNR (Blakeney et al., Fig. 3)",
    "level_curves": "Accuracy, PIE, CEV and SDE against level (Blakeney et al., Fig. 2)",
    "group_changes": "Group FPR/FNR change against the baseline population (Hooker et al. 2020)",
    "cev_vs_svcca": "CEV against SVCCA distance (Blakeney et al., Fig. 5)",
}
TABLE_TITLES = {
    "bias": "Populations: accuracy, CEV, SDE (95% CI), PIE, worst group",
    "models": "Per model",
    "cie": "CIE sets: accuracy on and off the set",
    "cie_composition": "Group composition of the CIE sets against the test set",
    "ttest": "Welch's t-test per class (recall), baseline vs compressed",
    "similarity": "SVCCA and linear CKA against the baseline",
    "similarity_cev_correlation": "Correlation of CEV with SVCCA distance per layer",
    "rates": "Rates and their normalised change, with bootstrap CIs",
    "cie_list": "CIE examples (also cie.csv for annotation)",
}
TABLES_OPEN = {"bias"}


def _img(name: str, png: bytes) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return f"<img alt='{html.escape(name)}' src='data:image/png;base64,{b64}'>"


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
        PNG images by name, embedded in that order (``gallery_*`` ones in
        one section of their own).
    notes : list of str
        Caveats (skipped similarity, gallery unavailable...).
    run_info : dict
        Run id, study, registered model, metrics version.

    Returns
    -------
    str
        One HTML document with no external references: the verdict (section
        ``verdict``), the largest harms (``harms``), key numbers, the
        contents (``contents``, a link to every section), then one
        ``<details>`` section per table or figure (id ``sec-<name>``) with
        sortable tables.
    """
    sections: list[tuple[str, str, str, bool]] = []  # (id, title, body, open)

    def add(sid: str, heading: str, body: str, is_open: bool = False) -> None:
        sections.append((sid, heading, body, is_open))

    def table(name: str, frame: pd.DataFrame) -> str:
        return table_html(frame, max_rows=5000, sortable=True, table_id=f"table-{name}")

    thresholds = settings.get("thresholds") or {}
    if isinstance(thresholds, str):
        try:
            thresholds = json.loads(thresholds)
        except ValueError:
            thresholds = {}
    gate_used = not any(v is not None for v in (thresholds or {}).values())
    if "versions" in tables and tables["versions"] is not None and not tables["versions"].empty:
        add(_slug("versions"), "Verdict per audited version", table("versions", tables["versions"]))
    if "gate" in tables and tables["gate"] is not None and not tables["gate"].empty:
        gate = tables["gate"].sort_values("excess_ci_low", ascending=False, na_position="last")
        heading = ("Default gate: excess harm per class and group" if gate_used
                   else "Excess harm per class and group (the gate's table; thresholds decided the verdicts)")
        add(_slug("gate"), heading,
            "<p class='note'>Percentage points; a row fails when its interval lies wholly above the tolerance. "
            "Sorted by the interval's lower bound.</p>" + table("gate", gate))
    if "bias" in tables and tables["bias"] is not None and not tables["bias"].empty:
        add(_slug("bias"), TABLE_TITLES["bias"], table("bias", tables["bias"]), True)
    for name, png in figures.items():
        if name.startswith("gallery_"):
            continue
        add(_slug(name), CAPTIONS.get(name, name), _img(name, png), True)
    galleries = [(n, p) for n, p in figures.items() if n.startswith("gallery_")]
    if galleries:
        add(_slug("gallery"), "Top CIE examples, for human review",
            "".join(f"<h3>{html.escape(n.replace('gallery_', '').replace('__', '/'))}</h3>{_img(n, p)}" for n, p in galleries))
    for name in ("models", "cie", "cie_composition", "ttest", "similarity", "similarity_cev_correlation", "rates", "cie_list"):
        if name in tables and tables[name] is not None and not tables[name].empty:
            add(_slug(name), TABLE_TITLES[name], table(name, tables[name]), name in TABLES_OPEN)
    add(_slug("settings"), "Settings", "<pre>" + html.escape(json.dumps(settings, indent=1, default=str)) + "</pre>")
    if notes:
        add(_slug("notes"), "Notes", "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>", True)

    harms = largest_harms(tables)
    meta = " &middot; ".join(f"{html.escape(str(k))}: {_fmt(v)}" for k, v in run_info.items())
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'><link rel='icon' href='data:,'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class='meta'>{meta}</p>",
        "<section class='head' id='verdict'><h2>Verdict</h2>" + verdict_html(tables.get("versions")) + "</section>",
        f"<section class='head' id='harms'><h2>Largest harms to a class or group</h2>{harms_html(harms, settings)}</section>",
        f"<section class='head' id='key-numbers'><h2>Key numbers</h2>{_key_numbers(summary)}</section>",
        "<nav id='contents'><h2>Contents</h2><ol>"
        + "".join(f"<li><a href='#{sid}'>{html.escape(heading)}</a></li>" for sid, heading, _, _ in sections)
        + "</ol></nav>",
    ]
    for sid, heading, body, is_open in sections:
        parts.append(f"<details id='{sid}'{' open' if is_open else ''}><summary><h2>{html.escape(heading)}</h2></summary>{body}</details>")
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    return "\n".join(parts)
