"""A real audit's report.html in headless Debian Chromium (selenium + Debian's chromedriver).

The audit runs through the service on a synthetic study registered in a temporary SQLite store
(sparsities and a named quantization mode, as the digits demo has). The page must load
without console errors or network requests, draw every image, land every contents link on its
section, sort a table when a header is clicked, and show the verdict on its first screen,
which is saved as a screenshot (``COMPBIAS_REPORT_SCREENSHOT=path`` keeps a copy).

Chromium is required, not optional: without it this test fails and says how to install it
(``.ci/run`` installs it).
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from compbias.platform.audit import AuditOptions, run_audit
from compbias.platform.audit.synthetic import SyntheticStudy, register_synthetic_study

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL = "apt-get install -y --no-install-recommends chromium chromium-driver"
WINDOW = (1280, 900)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """report.html of an audit of a synthetic study, run by the audit service."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    root = tmp_path_factory.mktemp("report-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    spec = SyntheticStudy(name="browser", n_examples=400, seeds=3, bootstrap=40,
                          methods={"magnitude": ["0.5", "0.9"], "magnitude+kd": ["0.9"], "quantize": ["int8_static"]})
    register_synthetic_study(client, spec, artifact_location=str(root / "artifacts"))
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        (res,) = run_audit(client, options=AuditOptions(cache_dir=root / "cache", output_dir=root / "out",
                                                        similarity=False, gallery=False, workers=2))
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    path = Path(res.report_path)
    assert path.is_file(), res.report_path
    return path


def require_chromium() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: the report is tested in a real browser; install it with `{INSTALL}` "
                    "(as root; .ci/run does this)", pytrace=False)


def test_chromium_and_chromedriver_are_installed():
    """Its own FAILED line (the other tests then error in their fixture with the same message)."""
    require_chromium()


def chromium_driver(profile: Path):
    """A headless Chromium driven by Debian's chromedriver; fails (not skips) when either is missing."""
    require_chromium()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: `pip install -e '.[test]'`", pytrace=False)
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(executable_path=str(CHROMEDRIVER)))


@pytest.fixture(scope="module")
def page(report, tmp_path_factory):
    driver = chromium_driver(tmp_path_factory.mktemp("chromium-profile"))
    try:
        driver.get(report.as_uri())
        # get() can return at "interactive" on a loaded machine (seen once in CI while other tests ran):
        # wait for the load to finish, and fail if it never does
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(driver, 60, poll_frequency=0.2).until(
            lambda d: d.execute_script("return document.readyState") == "complete",
            message="the report never finished loading (document.readyState stayed short of 'complete' for 60 s)")
        yield driver
    finally:
        driver.quit()


def js(driver, code, *args):
    return driver.execute_script(code, *args)


def test_loads_without_console_errors_or_network_requests(page):
    errors = [e for e in page.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == []
    assert js(page, "return document.title").startswith("compbias audit of browser")
    # nothing fetched: every resource the page loaded is inline
    fetched = js(page, "return performance.getEntriesByType('resource').map(e => e.name)")
    assert [u for u in fetched if not u.startswith("data:")] == []


def test_every_image_is_drawn(page):
    imgs = js(page, """return Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth}))""")
    assert len(imgs) >= 3  # class_changes, level_curves, group_changes
    assert [i["alt"] for i in imgs if not (i["complete"] and i["w"] > 0)] == []


def test_first_screen_shows_the_verdict_and_the_largest_harms_and_is_saved(page, tmp_path):
    js(page, "window.scrollTo(0, 0)")
    tops = js(page, """return ['verdict', 'harms'].map(id => {
        const r = document.getElementById(id).getBoundingClientRect(); return [r.top, r.bottom]; })""")
    height = js(page, "return window.innerHeight")
    assert all(0 <= top < bottom <= height for top, bottom in tops), (tops, height)
    verdict = page.find_element("id", "verdict").text
    assert "versions audited" in verdict and "fail" in verdict
    harms = page.find_element("id", "harms").text
    assert "class 3" in harms or "group ink=1" in harms  # the synthetic models' victims
    shot = tmp_path / "report-first-screen.png"
    assert page.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert (w, h) == (js(page, "return window.innerWidth"), height)
    keep = os.environ.get("COMPBIAS_REPORT_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)


def test_every_contents_link_lands_on_its_section(page):
    links = js(page, "return Array.from(document.querySelectorAll('nav#contents a')).map(a => a.getAttribute('href'))")
    assert len(links) >= 8
    missing = js(page, "return arguments[0].filter(h => !document.getElementById(h.slice(1)))", links)
    assert missing == []
    for href in links:
        js(page, "window.scrollTo(0, 0)")
        page.find_element("css selector", f"nav#contents a[href='{href}']").click()
        where = js(page, """const el = document.getElementById(arguments[0]); const r = el.getBoundingClientRect();
            const bottom = window.scrollY + window.innerHeight >= document.documentElement.scrollHeight - 2;
            return {top: r.top, open: el.tagName !== 'DETAILS' || el.open, bottom: bottom, hash: location.hash,
                    h: window.innerHeight}""", href[1:])
        assert where["hash"] == href
        assert where["open"], f"{href}: its section stays closed"
        # at the top of the window, or as high as it goes when the page ends
        assert abs(where["top"]) <= 2 or (where["bottom"] and 0 <= where["top"] < where["h"]), (href, where)


def test_clicking_a_header_sorts_the_table(page):
    js(page, "window.scrollTo(0, 0)")
    page.find_element("css selector", "nav#contents a[href='#sec-models']").click()

    def column(name):
        return js(page, """const t = document.getElementById('table-models');
            const heads = Array.from(t.tHead.rows[0].cells).map(c => c.textContent.trim());
            const i = heads.indexOf(arguments[0]), v = heads.indexOf('version');
            return Array.from(t.tBodies[0].rows).map(r => [r.cells[v].textContent, r.cells[i].textContent.trim()])""", name)

    before = column("acc")
    values = [float(a) for _, a in before]
    assert values != sorted(values), "pick a column that is not already sorted"
    header = next(th for th in page.find_elements("css selector", "#table-models thead th") if th.text.strip() == "acc")
    header.click()
    after = column("acc")
    assert [float(a) for _, a in after] == sorted(values)
    assert sorted(after) == sorted(before)  # whole rows moved: each version keeps its accuracy
    assert header.get_attribute("aria-sort") == "ascending"
    header.click()
    assert [float(a) for _, a in column("acc")] == sorted(values, reverse=True)
    assert header.get_attribute("aria-sort") == "descending"
    # a text column sorts too, and the page stayed error-free throughout
    status = next(th for th in page.find_elements("css selector", "#table-models thead th") if th.text.strip() == "version")
    status.click()
    names = [v for v, _ in column("acc")]
    assert names == sorted(names, key=lambda s: (s.rsplit("/", 1)[0], int(s.rsplit("/", 1)[1])))
    assert [e for e in page.get_log("browser") if e["level"] in ("SEVERE", "ERROR")] == []
