"""`kledger report --html`: the audit page. What it gathers (commits and their graph lanes, each
fact's history, open and decided conflicts, eval metrics), that the page is one self-contained
file that escapes what the ledger holds, and — in a real headless Chromium (Debian's package,
installed by .ci/setup) — that it loads with no console errors, shows its parts and pages through a
10,000-fact ledger without building one giant document."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import snapshot

from kledger.ledger import Ledger
from kledger.records import Fact
from kledger.report import lanes, metric_points

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _history(k) -> None:
    """main: France → Paris, then a decided conflict (Lyon kept), Italy twice (left open), a
    merged side branch."""
    assert k("init").code == 0
    k("add", "The capital of France is", "Paris", "--subject", "France", "--relation", "capital")
    k("commit", "-m", "France")
    k("add", "The capital of France is", "Lyon", "--subject", "France", "--relation", "capital")
    assert k("commit", "-m", "Lyon").code == 3
    assert k("resolve", "--newest").code == 0
    k("add", "The capital of Italy is", "Milan", "--subject", "Italy", "--relation", "capital")
    k("commit", "-m", "Italy")
    k("add", "The capital of Italy is", "Rome", "--subject", "Italy", "--relation", "capital")
    assert k("commit", "-m", "Italy again", "--allow-conflicts").code == 0
    assert k("checkout", "-b", "side", "HEAD~2").code == 0
    k("add", "Paris is in", "Germany", "--subject", "Paris")
    k("commit", "-m", "side")
    k("checkout", "main")
    assert k("merge", "side").code == 0


# ------------------------------------------------------------------ the data
def test_lanes_straight_line_and_merge():
    line = [{"id": c, "parents": [p] if p else []} for c, p in (("c", "b"), ("b", "a"), ("a", None))]
    assert lanes(line) == ([0, 0, 0], [[0, 1, 0], [1, 2, 0]])
    # m merges s (side) into b; s and b both come from a
    dag = [{"id": "m", "parents": ["b", "s"]}, {"id": "s", "parents": ["a"]}, {"id": "b", "parents": ["a"]},
           {"id": "a", "parents": []}]
    cols, edges = lanes(dag)
    assert cols == [0, 1, 0, 0]
    assert edges == [[0, 2, 0], [0, 1, 1], [1, 3, 1], [2, 3, 0]]  # s's line runs in lane 1 and joins a


def test_collect_facts_conflicts_and_graph(k, tmp_path):
    _history(k)
    out = tmp_path / "r.html"
    before = snapshot(tmp_path / ".kledger")
    r = k("report", "--html", out, "--json")
    assert r.code == 0, r.err
    doc = r.json
    assert doc["command"] == "report" and doc["path"] == str(out)
    assert (doc["commits"], doc["facts"], doc["in_force"]) == (6, 5, 4)
    assert (doc["open_conflicts"], doc["decided_conflicts"], doc["metric_points"]) == (1, 1, 0)
    assert snapshot(tmp_path / ".kledger") == before  # read-only
    data = _embedded(out.read_text())
    msgs = [c["message"] for c in data["commits"]]
    assert msgs[0] == "Merge 'side' into main" and msgs[-1] == "France"
    facts = {(f["subject"], f["target"]): f for f in data["facts"]}
    paris = facts[("France", "Paris")]
    assert not paris["in_force"]
    assert [(data["commits"][row]["message"], op, other) for row, op, other in paris["events"]] == [
        ("France", "add", []), ("Resolve france · capital: keep lyon", "retract", ["Lyon"])]
    assert [other for _, _, other in facts[("France", "Lyon")]["events"]] == [["Paris"]]  # a change, both ways
    assert facts[("France", "Lyon")]["in_force"] and facts[("Italy", "Rome")]["in_force"]
    (open_,), (decided,) = data["conflicts"]["open"], data["conflicts"]["decided"]
    assert open_["subject"] == "italy" and sorted(open_["objects"]) == ["milan", "rome"]
    assert decided["keep"] == ["lyon"] and decided["dropped"] == [paris["id"]] and decided["by"].startswith("Ada")
    g = data["graph"]
    assert {(e["state"], e["kind"]) for e in g["edges"]} == {("open", "hard"), ("decided", "hard")}
    assert len(g["nodes"]) == 4 and g["groups"] == 2
    page = out.read_text()
    assert 'id="conflict-graph"' in page and "edge-open" in page and "edge-decided" in page


def test_one_self_contained_page_that_escapes_the_ledger(k, tmp_path):
    assert k("init").code == 0
    evil = "<script>alert(1)</script>"
    k("add", f"Who is {evil} really", "</script><img src=x onerror=alert(2)>", "--subject", evil)
    k("commit", "-m", "<b>bold</b> & <!-- comment")
    assert k("report", "--html", tmp_path / "r.html").code == 0
    page = (tmp_path / "r.html").read_text()
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>bold" not in page
    assert page.count("<script") == 2  # the data block and the page's own script, nothing else
    # nothing is fetched: no URL other than in-page anchors and the SVG namespace
    urls = set(re.findall(r"(?:src|href)=\"([^\"#][^\"]*)\"", page)) | set(re.findall(r"https?://[^\"' )]+", page))
    assert urls == {"http://www.w3.org/2000/svg"}
    assert _embedded(page)["facts"][0]["subject"] == evil  # the text itself is kept, only escaped


def test_eval_points_along_the_history():
    index = {"c3": 0, "c2": 1, "c1": 2}  # rows: newest first
    hist = {"command": "eval", "revision": "c3", "base": {}, "edited": {},
            "history": [{"commit": None, "metrics": {"counterfact": {"efficacy": 0.1}, "perplexity": 30.0}},
                        {"commit": "c1", "metrics": {"counterfact": {"efficacy": 0.5}, "perplexity": 31.0}},
                        {"commit": "c3", "metrics": {"counterfact": {"efficacy": 0.9}, "perplexity": 33.0}}]}
    single = {"command": "eval", "revision": "c2", "base": {"counterfact": {"efficacy": 0.1}},
              "edited": {"counterfact": {"efficacy": 0.7}, "perplexity": float("nan")}}
    other = {"command": "eval", "revision": "elsewhere", "base": {}, "edited": {}}
    m = metric_points([hist, single, other], index)
    assert [p["label"] for p in m["points"]] == ["base", "c1", "c2", "c3"]
    series = {s["name"]: s["ys"] for s in m["series"]}
    assert series["CounterFact efficacy"] == [0.1, 0.5, 0.7, 0.9]
    assert series["perplexity"] == [None, 31.0, None, 33.0]  # the base point came from `single` (no perplexity), NaN dropped
    assert m["skipped"] == 1


@pytest.mark.parametrize("args, code, words", [
    (("--html", "{tmp}/no/such/r.html"), 2, "no folder"),
    (("--html", "{tmp}"), 2, "it is a folder"),
    (("--html", "{tmp}/r.html", "--eval", "{tmp}/missing.json"), 2, "no such file"),
    (("--html", "{tmp}/r.html", "--eval", "{tmp}/notes.json"), 2, "is not a `kledger eval --json` document"),
    (("--html", "{tmp}/r.html", "--eval", "{tmp}/broken.json"), 2, "cannot read eval results"),
    (("HEAD", "--all", "--html", "{tmp}/r.html"), 2, "give REV or --all"),
    (("nosuchrev", "--html", "{tmp}/r.html"), 2, "nosuchrev"),
    ((), 2, "--html"),
])
def test_bad_input_is_one_line_and_writes_nothing(k, tmp_path, args, code, words):
    _history(k)
    (tmp_path / "notes.json").write_text('{"command": "log"}')
    (tmp_path / "broken.json").write_text('{"command": ')
    before = snapshot(tmp_path / ".kledger")
    r = k("report", *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.code == code, (r.code, r.err)
    assert words in r.err and r.err.strip().count("\n") == 0, r.err
    assert not (tmp_path / "r.html").exists() and snapshot(tmp_path / ".kledger") == before


def test_an_unwritable_folder_is_one_line(k, tmp_path):
    _history(k)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root writes anyway: a folder no one can create files in
            r = k("report", "--html", "/proc/kledger-report.html")
        else:
            r = k("report", "--html", ro / "r.html")
    finally:
        ro.chmod(0o700)
    assert r.code == 2 and "cannot write the report" in r.err and r.err.strip().count("\n") == 0, r.err


def test_empty_ledger_and_all_branches(k, tmp_path):
    assert k("init").code == 0
    assert k("report", "--html", tmp_path / "e.html").code == 0
    assert "no commits yet" in (tmp_path / "e.html").read_text()
    _more = [("a", "x"), ("b", "y")]
    for s, t in _more:
        k("add", f"{s} is", t, "--subject", s)
        k("commit", "-m", s)
    k("checkout", "-b", "other", "HEAD~1")
    k("add", "c is", "z", "--subject", "c")
    k("commit", "-m", "c")
    k("checkout", "main")
    r = k("report", "--all", "--html", tmp_path / "a.html", "--json")
    assert r.json["commits"] == 3
    assert k("report", "--html", tmp_path / "m.html", "--json").json["commits"] == 2


def _embedded(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="kledger-data">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


# ------------------------------------------------------------------ in a real browser
@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright (no browser download: its executable is given). In CI
    both are installed (.ci/setup), so there a missing one fails the test instead of skipping it."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("the browser test needs Chromium and Playwright: .ci/setup installs them")
        pytest.skip("no Chromium or Playwright here (apt-get install chromium; pip install playwright)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield b
        b.close()


def open_page(browser, path: Path, width: int = 1280):
    """The page loaded from its file, with every console error, page error, dialog and request
    (other than the file itself) recorded."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    seen: dict[str, list] = {"errors": [], "dialogs": [], "requests": []}
    page.on("console", lambda m: seen["errors"].append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
    page.on("request", lambda r: seen["requests"].append(r.url) if r.url != path.as_uri() else None)
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    return page, seen


def test_page_in_chromium(browser, k, tmp_path):
    _history(k)
    evil = "<img src=x onerror=alert(3)>"
    k("add", f"{evil} lives in", "Oslo", "--subject", evil)
    k("commit", "-m", evil)
    assert k("report", "--html", tmp_path / "r.html").code == 0
    page, seen = open_page(browser, tmp_path / "r.html")
    assert seen == {"errors": [], "dialogs": [], "requests": []}
    assert page.locator("tr.commit").count() == 7 and page.locator("tr.fact").count() == 6
    assert page.locator("#commits-graph circle").count() == 7 and page.locator("#commits-graph polyline").count() == 7
    assert page.locator("tr.open-conflict").count() == 1 and page.locator("tr.decided-conflict").count() == 1
    assert page.locator("#conflict-graph .node").count() == 4
    assert page.locator("tr.fact", has_text=evil).count() == 1  # shown as text, not run
    assert page.locator("tr.fact", has_text="France is Paris").locator(".ev").nth(1).inner_text().startswith("changed to Lyon in")
    page.fill("#fact-filter", "italy")
    assert page.locator("tr.fact").count() == 2
    page.select_option("#fact-state", "out")
    assert page.locator("tr.fact").count() == 0
    page.fill("#fact-filter", "")
    assert [t.strip() for t in page.locator("tr.fact td:nth-child(2)").all_inner_texts()] == ["capital"]
    page.fill("#commit-filter", "italy")
    assert page.locator("tr.commit").count() == 2 and not page.locator("#commits-graph").is_visible()
    page.close()


def test_page_with_eval_metrics(browser, k, tmp_path):
    _history(k)
    head = k("log", "--json").json["commits"]
    doc = {"version": 1, "command": "eval", "revision": head[0]["id"], "base": {"counterfact": {"efficacy": 0.2}},
           "edited": {"counterfact": {"efficacy": 0.9}},
           "history": [{"commit": None, "metrics": {"counterfact": {"efficacy": 0.2}, "perplexity": 30.5}}]
           + [{"commit": c["id"], "metrics": {"counterfact": {"efficacy": 0.5 + 0.05 * i}, "perplexity": 31.0 + i}}
              for i, c in enumerate(reversed(head))]}
    (tmp_path / "e.json").write_text(json.dumps(doc))
    assert k("report", "--html", tmp_path / "r.html", "--eval", tmp_path / "e.json").code == 0
    page, seen = open_page(browser, tmp_path / "r.html")
    assert seen["errors"] == [] and seen["requests"] == []
    assert page.locator("#metrics-rates polyline.series").count() == 1
    assert page.locator("#metrics-rates circle").count() == 7  # base + 6 commits
    assert page.locator("#metrics-perplexity polyline.series").count() == 1
    page.close()


def _big_ledger(root: Path, n_facts: int, per_commit: int) -> None:
    lg = Ledger.init(root, model="none")
    for start in range(0, n_facts, per_commit):
        lg.add([Fact.create(f"The capital of land {i} is", f"City {i}", f"land {i}", relation="capital")
                for i in range(start, start + per_commit)])
        lg.commit(f"facts {start}-{start + per_commit - 1}", author=f"author{start // per_commit % 3}")
    lg.remove("land 7", "capital")
    lg.commit("retract land 7", author="author0")
    lg.close()


def test_ten_thousand_facts_page_by_page(browser, k, tmp_path):
    _big_ledger(tmp_path, 10_000, 100)
    t = time.perf_counter()
    r = k("-C", tmp_path / ".kledger", "report", "--html", tmp_path / "big.html", "--json")
    made = time.perf_counter() - t
    assert r.code == 0 and r.json["facts"] == 10_000 and r.json["commits"] == 101 and r.json["in_force"] == 9_999
    page, seen = open_page(browser, tmp_path / "big.html")
    assert seen["errors"] == []
    assert page.locator("tr.fact").count() == 50 and page.locator("tr.commit").count() == 50
    assert page.evaluate("document.getElementsByTagName('*').length") < 3000  # not one giant tree
    assert "1–50 of 10000" in page.inner_text("#facts-pager")
    page.click("#facts-next")
    assert "51–100 of 10000" in page.inner_text("#facts-pager")
    page.fill("#fact-filter", "land 7")  # land 7, 70–79, 700–799, 7000–7999
    assert "of 1111" in page.inner_text("#facts-pager")
    page.select_option("#fact-state", "out")
    assert page.locator("tr.fact").count() == 1
    page.click("#commits-next")
    page.click("#commits-next")
    assert page.locator("tr.commit").count() == 1 and page.locator("tr.commit").inner_text().count("facts 0-99") == 1
    page.close()
    print(f"report of 10,000 facts: made in {made:.2f} s, {r.json['bytes'] / 1e6:.1f} MB")
