"""The fast path for `status` and `log` (kledger.cli.fast): the same output and exit code as the
full CLI for every form it answers, the full CLI for every other form and for errors, and none
of typer, click, pydantic or rich imported when it answers piped output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kledger.cli import fast


def _both(k, capsys, *args: str, answered: bool | None = None):
    """(the entry point's result, the full CLI's result) as (exit code, stdout, stderr); with
    `answered`, whether the fast path itself answered (rather than handing over) is checked."""
    from kledger.cli import run

    capsys.readouterr()
    took: list[bool] = []
    real = fast.answer

    def spy(argv):
        took.append(real(argv))
        return took[-1]

    fast.answer = spy
    try:
        run(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        fast.answer = real
    cap = capsys.readouterr()
    if answered is not None:
        assert took == [answered]
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
    got, want = _both(history, capsys, *args, answered=True)
    assert got == want
    if "--json" in args:
        assert json.loads(got[1])["version"] == 1


@pytest.mark.parametrize("args", [("log", "-n", "0"), ("log", "-n", "x"), ("log", "HEAD"), ("log", "--subject", "a"),
                                  ("status", "--json", "--json"), ("status", "extra"), ("-C",), ("--device", "cpu", "status"),
                                  ("log", "-n"), ("status", "--help"), ("add", "a", "b")])
def test_other_forms_go_to_the_full_cli(args):
    assert fast._parse(list(args)) is None


def test_errors_are_reported_as_the_full_cli_reports_them(k, tmp_path, capsys):
    """No ledger here: the error, in text or JSON, and the exit code are the full CLI's."""
    got, want = _both(k, capsys, "status")
    assert got == want and got[0] != 0 and "error" in got[2]
    got, want = _both(k, capsys, "-C", str(tmp_path / "missing"), "log", "--json")
    assert got == want and got[0] != 0 and json.loads(got[1])["error"]["exit_code"] == got[0]


def test_a_busy_ledger_is_waited_for_once(history, capsys, monkeypatch):
    """A ledger another process holds for writing: the fast path reports the lock itself rather
    than handing over to the full CLI, which would wait for it a second time."""
    from kledger.errors import KledgerError
    from kledger.ledger import Ledger

    calls = []

    def locked(*a, **k):
        calls.append(1)
        raise KledgerError("the ledger is locked by another kledger process", "wait, or set KLEDGER_LOCK_WAIT")

    monkeypatch.setattr(Ledger, "open", classmethod(lambda cls, *a, **k: locked()))
    got, want = _both(history, capsys, "status")
    assert got == want and got[0] != 0 and "locked" in got[2]
    assert len(calls) == 2  # once by the fast path, once by the full CLI run for comparison


def test_forced_colour_on_a_pipe_is_left_to_rich(history, capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    got, want = _both(history, capsys, "log", "--oneline", answered=True)
    assert got == want


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
