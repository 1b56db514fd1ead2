"""Issue 11 ("Trust"): bad input and damaged ledgers give one-line errors, never tracebacks, and
leave the ledger as it was; inputs that used to be wrongly accepted are refused; `--json` output
is never broken by DuckDB's progress bar."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

from kledger.ledger import Ledger
from kledger.settings import Settings
from kledger.store import Store

ENV = Settings(author="Ada <ada@example.org>", date="2026-01-01T00:00:00+00:00", model="none", lock_wait=0.3)


def one_line_error(r, code: int = 2, *words: str) -> None:
    """`r` failed with `code`, said so on one line of stderr, and printed no traceback."""
    assert r.code == code, (r.code, r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.err
    assert "Traceback" not in r.err + r.out
    for w in words:
        assert w in r.err, (w, r.err)


# ------------------------------------------------------------------------------ C: progress bar
def test_progress_bar_is_off_on_every_connection(tmp_path):
    """DuckDB's Python client prints a progress bar on stdout for queries over 2 s, which would
    break `--json`: every connection the store makes turns it off. (DuckDB turns it on by default
    only in what it takes for an interactive session, such as `python -c`, so that is where this
    runs.)"""
    code = textwrap.dedent(f"""
        from pathlib import Path
        from kledger import store
        from kledger.store import Store
        SQL = "SELECT current_setting('enable_progress_bar')"
        d = Path({str(tmp_path)!r}) / ".kledger"
        seen = []
        with Store.create(d, {{}}) as st:
            seen.append(st.con.execute(SQL).fetchone()[0])
        for write in (False, True):
            with Store.open(d, write=write) as st:
                seen.append(st.con.execute(SQL).fetchone()[0])
        con = store._connect(d.parent / "other.duckdb")  # the one place connections are made (create's too)
        seen.append(con.execute(SQL).fetchone()[0])
        con.close()
        import duckdb
        print("DEFAULT", duckdb.connect(":memory:").execute(SQL).fetchone()[0], "SEEN", seen)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["DEFAULT", "True", "SEEN", "[False,", "False,", "False,", "False]"], r.stdout


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
