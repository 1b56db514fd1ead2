"""The docs stay true to the code.

- Every `$ ` command of docs/tutorial.md (in ```console blocks) runs, in order, in one bash
  session in a temp directory, and exits 0, or with N when the line ends in `# fails: exit N`.
- Every command of the typer app has a heading in docs/cli.md, and every command that prints a
  JSON document has a heading in docs/json.md.
- Every `--option` named anywhere in docs/*.md is an option of some kledger command.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FAILS = re.compile(r"#\s*fails:\s*exit\s+(\d+)\s*$")
MARK = "@@kledger-docs-step"


def tutorial_steps(doc: Path = DOCS / "tutorial.md", section: str | None = None) -> list[tuple[str, int]]:
    """(command, expected exit code) for every `$ ` line of the console blocks of `doc` (of its
    `## section` only, if given)."""
    steps, in_console, pending = [], False, None
    lines = doc.read_text(encoding="utf-8").splitlines()
    if section is not None:
        start = lines.index(f"## {section}") + 1
        end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines = lines[start:end]
    for line in lines:
        s = line.strip()
        if s.startswith("```"):
            in_console = (not in_console) and s[3:].strip() == "console"
            continue
        if not in_console:
            continue
        if pending is not None:  # continuation of a `\`-terminated command
            pending += "\n" + line
        elif s.startswith("$ "):
            pending = s[2:]
        else:
            continue  # output line
        if pending.endswith("\\"):
            continue
        m = FAILS.search(pending)
        steps.append((pending, int(m.group(1)) if m else 0))
        pending = None
    return steps


def _script(steps: list[tuple[str, int]], rc_file: Path) -> str:
    lines = []
    if shutil.which("kledger", path=os.environ["PATH"]) is None:
        lines.append(f'kledger() {{ {shlex.quote(sys.executable)} -m kledger "$@"; }}')
    for i, (cmd, _) in enumerate(steps):
        lines += [f"echo '{MARK} {i}'; echo '{MARK} {i}' >&2",
                  cmd,
                  f'echo "{i} $?" >> {shlex.quote(str(rc_file))}']
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(not (DATA / "counterfact-train.json").is_file(), reason="shared data not found")
def test_tutorial_runs(tmp_path):
    steps = tutorial_steps()
    assert len(steps) > 20, "the tutorial should have its commands in ```console blocks"
    _run_steps(steps, tmp_path, timeout=300)


@pytest.mark.real
@pytest.mark.skipif(not (DATA / "counterfact-train.json").is_file(), reason="shared data not found")
def test_readme_using_it_runs_as_written(tmp_path):
    """The README's "Using it", top to bottom as written, on the real default model, in a new
    folder beside the shared data (as the README says: `../shared/data` is found from it)."""
    steps = tutorial_steps(REPO / "README.md", "Using it")
    assert len(steps) > 15 and steps[0][0].startswith("kledger init")
    (tmp_path / "shared").symlink_to(DATA.parent)
    _run_steps(steps, tmp_path, timeout=1500, work_name="try")
    assert (tmp_path / "try" / "report.html").is_file() and (tmp_path / "try" / "history.png").is_file()


def _run_steps(steps: list[tuple[str, int]], tmp_path: Path, timeout: int, work_name: str = "work") -> None:
    rc_file = tmp_path / "rc.txt"
    work = tmp_path / work_name
    work.mkdir()
    keep = ("KLEDGER_DEVICE", "KLEDGER_CACHE")  # the caches of the model and the corpus are shared
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLEDGER_") or k in keep}
    env.update({"DATA": str(DATA), "KLEDGER_AUTHOR": "Ada <ada@example.org>",
                "KLEDGER_DATE": "2026-01-01T00:00:00+00:00", "KLEDGER_LOCK_WAIT": "5",
                "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
                "NO_COLOR": "1", "COLUMNS": "120"})
    proc = subprocess.run(["bash", "--noprofile", "--norc", "-c", _script(steps, rc_file)], cwd=work, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    codes = {}
    if rc_file.exists():
        for line in rc_file.read_text().splitlines():
            i, rc = line.split()
            codes[int(i)] = int(rc)
    outputs = re.split(rf"^{MARK} \d+$\n?", proc.stdout, flags=re.M)[1:]
    for i, (cmd, want) in enumerate(steps):
        got = codes.get(i)
        shown = "\n".join(outputs[2 * i: 2 * i + 2])[-3000:] if len(outputs) > 2 * i else proc.stdout[-3000:]
        assert got == want, f"step {i + 1}: `{cmd}` exited {got}, expected {want}\n{shown}"


def _app_commands() -> dict:
    import typer

    from kledger.cli import main

    main._register()
    return typer.main.get_command(main.app).commands


def _headings(doc: str) -> list[str]:
    return [line for line in (DOCS / doc).read_text(encoding="utf-8").splitlines() if line.startswith("#")]


def _has_heading(headings: list[str], name: str) -> bool:
    pat = re.compile(rf"`kledger {re.escape(name)}(?![\w-])")
    return any(pat.search(h) for h in headings)


def test_every_command_has_a_heading_in_cli_md():
    headings = _headings("cli.md")
    missing = [name for name in _app_commands() if not _has_heading(headings, name)]
    assert not missing, f"docs/cli.md has no heading for: {', '.join(missing)}"


def test_every_json_document_is_in_json_md():
    names = set()
    for path in (REPO / "kledger" / "cli").glob("*.py"):
        names |= set(re.findall(r'(?:emit_json|_report)\(\s*"([a-z][a-z-]*)"', path.read_text(encoding="utf-8")))
    assert names, "no emit_json calls found"
    headings = _headings("json.md")
    missing = sorted(n for n in names if not _has_heading(headings, n))
    assert not missing, f"docs/json.md has no heading for: {', '.join(missing)}"
    text = (DOCS / "json.md").read_text(encoding="utf-8")
    assert '"error"' in text and "exit_code" in text


def test_documented_options_exist():
    commands = _app_commands()
    import typer

    from kledger.cli import main

    known = {"--help"}
    for cmd in [typer.main.get_command(main.app), *commands.values()]:
        for p in cmd.params:
            known |= {o for o in [*p.opts, *p.secondary_opts] if o.startswith("--")}
    unknown = {}
    for doc in sorted(DOCS.glob("*.md")):
        for line in doc.read_text(encoding="utf-8").splitlines():
            if "bench/" in line or "pytest" in line or "pip " in line:  # other programs' options
                continue
            for opt in re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", line):
                if opt not in known:
                    unknown.setdefault(opt, doc.name)
    assert not unknown, f"options documented but not in the CLI: {unknown}"
