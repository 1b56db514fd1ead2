"""The fast path for `status` and `log` (kledger.cli.fast): the same output and exit code as the
full CLI for every form it answers, the full CLI for every other form and for errors, and none
of typer, click, pydantic or rich imported when it answers piped output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kledger.cli import fast


def _both(k, capsys, *args: str):
    """(fast path's result, full CLI's result) as (exit code, stdout, stderr)."""
    from kledger.cli import run

    capsys.readouterr()
    try:
        run(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    cap = capsys.readouterr()
    full = k(*args)
    return (code, cap.out, cap.err), (full.code, full.out, full.err)


@pytest.fixture
def history(k):
    assert k("init", "--model", "none").code == 0
    for i in range(3):
        assert k("add", f"Thing {i} is made of", "wood", "--subject", f"Thing {i}").code == 0
        assert k("commit", "-m", f"commit {i}\n\nbody line", "--author", "tester").code == 0
    assert k("branch", "side").code == 0
    assert k("add", "Thing 9 is made of", "[bold]stone[/]", "--subject", "Thing 9").code == 0  # markup-like text
    return k


FORMS = [("status",), ("status", "--json"), ("log",), ("log", "-n", "2"), ("log", "-n2"), ("log", "--oneline"),
         ("log", "--max-count=1", "--oneline"), ("log", "--max-count", "2", "--json"), ("log", "--all", "--oneline"),
         ("-C", ".", "status"), ("--ledger=.", "log", "--oneline")]


@pytest.mark.parametrize("args", FORMS)
def test_fast_path_prints_what_the_full_cli_prints(history, capsys, args):
    assert fast._parse(list(args)) is not None  # a form the fast path answers
    got, want = _both(history, capsys, *args)
    assert got == want
    if "--json" in args:
        assert json.loads(got[1])["version"] == 1


@pytest.mark.parametrize("args", [("log", "-n", "0"), ("log", "-n", "x"), ("log", "HEAD"), ("log", "--subject", "a"),
                                  ("status", "--json", "--json"), ("status", "extra"), ("-C",), ("--device", "cpu", "status"),
                                  ("log", "-n"), ("status", "--help"), ("add", "a", "b")])
def test_other_forms_go_to_the_full_cli(args):
    assert fast._parse(list(args)) is None


def test_errors_are_reported_by_the_full_cli(k, tmp_path, capsys):
    """No ledger here: the fast path declines and the full CLI reports the error its own way."""
    got, want = _both(k, capsys, "status")
    assert got == want and got[0] != 0 and "error" in got[2]
    got, want = _both(k, capsys, "-C", str(tmp_path / "missing"), "log", "--json")
    assert got == want and got[0] != 0


def test_a_bad_device_setting_is_refused_as_by_the_full_cli(history, capsys, monkeypatch):
    monkeypatch.setenv("KLEDGER_DEVICE", "tpu")
    got, want = _both(history, capsys, "status")
    assert got == want and got[0] != 0 and "device" in got[2]


def test_piped_status_imports_no_cli_framework(history, tmp_path):
    code = ("import sys; from kledger.cli import fast; assert fast.answer(['log', '-n', '1']); "
            "assert fast.answer(['status']); "
            "print(sorted(m for m in ('typer', 'click', 'pydantic', 'rich', 'torch', 'networkx') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert p.stdout.strip().splitlines()[-1] == "[]"
