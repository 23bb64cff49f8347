"""The report opens with what a reader needs (verdict, largest harms), then a contents list whose
links all land on a section, then collapsible, sortable detail sections, in one file with no
network reference. Its behaviour in a browser is tests/e2e/test_report_browser.py."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pandas as pd
import pytest

from compbias.platform.audit import figures as F
from compbias.platform.audit.report import largest_harms, render_report
from compbias.platform.audit.synthetic import SyntheticStudy
from tests.platform.audit.test_figures import synthetic_outcome


class Outline(HTMLParser):
    """Element ids in document order, contents links, <details> ids, external references, tables."""

    def __init__(self):
        super().__init__()
        self.ids, self.links, self.details, self.external, self.tables, self.order = [], [], [], [], [], []
        self._in_nav = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "nav" and a.get("id") == "contents":
            self._in_nav = True
        if tag == "a" and self._in_nav:
            self.links.append(a.get("href", ""))
        if tag == "details":
            self.details.append(a.get("id"))
        if tag == "table":
            self.tables.append(a.get("class", ""))
        for key in ("src", "href"):
            v = a.get(key)
            if v is not None and not v.startswith(("data:", "#")):
                self.external.append(f"{tag} {key}={v[:40]}")
        if tag in ("script", "link") and tag == "script" and "src" in a:
            self.external.append("script src")
        self.order.append((tag, a.get("id")))

    def handle_endtag(self, tag):
        if tag == "nav":
            self._in_nav = False


@pytest.fixture(scope="module")
def outcome():
    return synthetic_outcome(SyntheticStudy(n_examples=400, seeds=3, methods={"magnitude": ["0.5", "0.9"], "magnitude+kd": ["0.9"],
                                                                              "quantize": ["int8_static"]}))


def render(outcome, *, thresholds=None, figures=True):
    figs = {}
    if figures:
        figs = {"class_changes": F.to_png(F.class_change_scatter(outcome.plots["class_changes"])),
                "level_curves": F.to_png(F.level_curves(outcome.tables["bias"]))}
    return render_report(title="compbias audit of s (m)", summary=outcome.summary,
                         settings={"thresholds": thresholds or {}, "gate": json.dumps(outcome.settings.gate.model_dump())},
                         tables=outcome.tables, figures=figs, notes=["similarity skipped: no weights"],
                         run_info={"audit run": "r1", "study": "s"})


def test_report_opens_with_verdict_then_harms_then_contents_then_details(outcome):
    page = render(outcome)
    o = Outline()
    o.feed(page)
    pos = {i: k for k, i in enumerate(o.ids)}
    assert pos["verdict"] < pos["harms"] < pos["contents"] < min(pos[d] for d in o.details)
    # the verdict: counts and each failing population once, with its reason
    versions = outcome.tables["versions"]
    head = page[page.index("id='verdict'"):page.index("id='harms'")]
    n_fail = int((versions["status"] == "fail").sum())
    assert f"{n_fail} fail" in head and f"{int((versions['status'] == 'pass').sum())} pass" in head
    for (method, level), part in versions[versions["status"] == "fail"].groupby(["method", "level"]):
        assert head.count(f"<b>{method}/{level}</b>") == 1
        assert part["reason"].iloc[0].split(" (")[0].replace(">", "&gt;") in head
    assert "<table" not in head  # compact: no 18-row table before the reader sees the harms


def test_largest_harms_are_the_gate_cells_with_the_largest_excess_and_their_intervals(outcome):
    gate = outcome.tables["gate"]
    cells = gate[(gate["cell"] != "overall") & gate["excess_pp"].notna()].sort_values("excess_pp", ascending=False)
    top = largest_harms(outcome.tables)
    assert len(top) == 3
    assert list(top["value"]) == pytest.approx(list(cells["excess_pp"].head(3)))
    assert (top["ci_low"] <= top["value"]).all() and (top["value"] <= top["ci_high"]).all()
    # the synthetic models were made to lose class 3 (and ink=1): that is the largest harm, and significant
    assert top["who"].iloc[0] in ("class 3", "group ink=1") and bool(top["significant"].iloc[0])
    page = render(outcome)
    harms = page[page.index("id='harms'"):page.index("id='key-numbers'")]
    first = cells.iloc[0]
    assert f"{first['excess_pp']:+.1f}" in harms and f"[{first['excess_ci_low']:+.1f}, {first['excess_ci_high']:+.1f}]" in harms


def test_largest_harms_fall_back_to_group_rate_changes_without_a_gate_table(outcome):
    tables = {k: v for k, v in outcome.tables.items() if k != "gate"}
    top = largest_harms(tables)
    rates = outcome.tables["rates"]
    groups = rates[(rates["scope"] == "group") & rates["metric"].isin(["fpr", "fnr"]) & (rates["method"] != "baseline")]
    assert list(top["value"]) == pytest.approx(sorted(groups["change_pct"].dropna(), reverse=True)[:3])
    assert top["who"].str.startswith("group ").all()


def test_every_contents_link_targets_one_section_and_every_table_sorts(outcome):
    page = render(outcome)
    o = Outline()
    o.feed(page)
    assert len(o.ids) == len(set(o.ids)), "duplicate element ids"
    targets = [h[1:] for h in o.links]
    assert targets and all(h.startswith("#") for h in o.links)
    assert set(targets) <= set(o.ids)
    assert set(targets) == set(o.details)  # every detail section is listed
    detail_tables = [c for c in o.tables if c != "harms"]
    assert detail_tables and all("sortable" in c for c in detail_tables)
    assert "<script>" in page and "aria-sort" in page
    # the big tables are there whole, not cut at 200 rows
    rates = outcome.tables["rates"]
    section = page[page.index("id='sec-rates'"):]
    section = section[:section.index("</details>")]
    assert section.count("<tr") == len(rates) + 1  # the header row and every row


def test_one_file_no_network(outcome):
    page = render(outcome)
    o = Outline()
    o.feed(page)
    assert o.external == []
    assert page.count("data:image/png;base64,") == 2
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:)?//""", page)
    assert "@import" not in page and "url(http" not in page


def test_with_thresholds_the_gate_table_is_still_listed_but_not_called_the_verdict(outcome):
    page = render(outcome, thresholds={"cev": 1e9})
    assert "id='sec-gate'" in page and "thresholds decided the verdicts" in page


def test_empty_audit_renders():
    page = render_report(title="t", summary={}, settings={}, tables={"versions": pd.DataFrame()}, figures={}, notes=[], run_info={})
    assert "No version was audited" in page and "id='contents'" in page
