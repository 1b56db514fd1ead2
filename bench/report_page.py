"""The screenshot of `kledger report` in docs/img/report.png, from a real ledger on the default model.

Replays ledgers/counterfact-demo (40 CounterFact records in 6 commits, a branch, a merge and a
revert; measured on SmolLM2 as it is replayed), adds a contradiction that is decided with
`resolve --newest` and one left open with `--allow-conflicts`, scores the history with
`kledger eval --plot --json`, writes the report with that document and photographs it in Debian's
Chromium (driven by Playwright) with the fact list filtered to the contradicted subjects.

    OMP_NUM_THREADS=1 python bench/report_page.py [--out docs/img/report.png] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kl(*args: str, cwd: Path, ok: tuple[int, ...] = (0,)) -> str:
    env = {**os.environ, "KLEDGER_AUTHOR": "Grace Reviewer <grace@example.org>"}
    r = subprocess.run([sys.executable, "-m", "kledger", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode not in ok:
        raise SystemExit(f"kledger {' '.join(args)} → {r.returncode}: {r.stderr.strip()[-2000:]}")
    return r.stdout


def build(work: Path) -> Path:
    """The replayed ledger with one decided and one open contradiction (made once; kept in --work)."""
    from kledger.ledger import Ledger

    led = work / "cf"
    if (led / ".kledger").exists():
        return led
    kl("init", str(led), "--from", str(ROOT / "ledgers" / "counterfact-demo"), cwd=work)
    with Ledger.open(led) as lg:
        facts = lg.history.facts_in_force(lg.head())
    first, second = [f for f in facts if len(f.prompt.split()) >= 5][:2]  # two readable prompts
    for f, new, how in ((first, "Italian", "decided"), (second, "Atlantis", "open")):
        kl("add", f.prompt, new, "--subject", f.subject, "--relation", f.relation, cwd=led)
        msg = f"{f.subject}: {new}, per the 2026 survey"
        if how == "decided":  # refused (exit 3), then decided for the newest claim
            kl("commit", "-m", msg, cwd=led, ok=(3,))
            kl("resolve", "--newest", cwd=led)
        else:  # recorded with the contradiction left open
            kl("commit", "-m", msg, "--allow-conflicts", cwd=led)
    (work / "subjects.txt").write_text(f"{first.subject}\n{second.subject}\n")
    return led


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "img" / "report.png"))
    ap.add_argument("--work", default=None, help="keep the ledger and files here (default: a temporary folder)")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="kledger-report-"))
    work.mkdir(parents=True, exist_ok=True)
    led = build(work)
    ev = work / "eval.json"
    if not ev.exists():
        ev.write_text(kl("eval", "--plot", str(work / "history.png"), "--json", "--gen-tokens", "8", cwd=led))
    kl("report", "--html", str(work / "report.html"), "--eval", str(ev), cwd=led)
    shoot(work / "report.html", Path(a.out))
    print(f"wrote {a.out} from {work / 'report.html'}")
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)


def shoot(html: Path, png: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which("chromium"), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = b.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
        page.goto(html.as_uri())
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#fact-filter", html.parent.joinpath("subjects.txt").read_text().split("\n")[0])
        page.screenshot(path=str(png), full_page=True)
        b.close()


if __name__ == "__main__":
    main()
