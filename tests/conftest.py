"""Shared fixtures. `k` runs the kledger CLI in-process inside a fresh directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

try:  # CI runs the same examples every time, so a landing never fails on a new random draw
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True, database=None)
    if os.environ.get("CI"):
        _hypothesis_settings.load_profile("ci")
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    pass

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self):
        return json.loads(self.out)


@pytest.fixture(autouse=True)
def device_for_tests(monkeypatch):
    """Every test runs on the CPU, whose tolerances the tests were written for, also on a machine
    with a GPU; the CUDA paths have their own test in test_device.py. KLEDGER_TEST_DEVICE=cuda runs
    the whole suite on the GPU instead. (Each command reads $KLEDGER_DEVICE once, into its Settings; setting
    it here makes teardown restore it.)"""
    monkeypatch.setenv("KLEDGER_DEVICE", os.environ.get("KLEDGER_TEST_DEVICE", "cpu"))


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("KLEDGER_AUTHOR", "Ada <ada@example.org>")
    monkeypatch.setenv("KLEDGER_LOCK_WAIT", "0.3")
    # ledger tests use facts-only ledgers; the edit engine has its own tests
    monkeypatch.setenv("KLEDGER_MODEL", "none")
    monkeypatch.delenv("KLEDGER_DIR", raising=False)
    monkeypatch.delenv("KLEDGER_FAULT", raising=False)
    monkeypatch.delenv("KLEDGER_DATE", raising=False)


@pytest.fixture
def k(tmp_path, monkeypatch, capsys, env):
    """k("add", ...) → Result. Runs in tmp_path."""
    from kledger.cli import main

    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> Result:
        main._state.update({"ledger": None, "json": False})
        capsys.readouterr()
        try:
            main.run([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        cap = capsys.readouterr()
        return Result(code, cap.out, cap.err)

    return run


@pytest.fixture
def ledger_dir(k, tmp_path):
    assert k("init").code == 0
    return tmp_path / ".kledger"


def subprocess_kledger(args, cwd, env_extra=None, timeout=60):
    env = {**os.environ, "KLEDGER_AUTHOR": "Ada <ada@example.org>", "KLEDGER_LOCK_WAIT": "0.3",
           "KLEDGER_MODEL": "none", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "kledger", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(ledger_path: Path) -> dict:
    """Everything a user can see of a ledger, for 'the ledger is unchanged' assertions."""
    from kledger.ledger import Ledger

    with Ledger.open(ledger_path) as lg:
        tables = {}
        for (name,) in lg.store.con.execute("SELECT table_name FROM information_schema.tables").fetchall():
            tables[name] = sorted(map(repr, lg.store.con.execute(f'SELECT * FROM "{name}"').fetchall()))
        return tables


# ------------------------------------------------------------------ remotes: a directory, and S3
S3_ENV = {"AWS_ACCESS_KEY_ID": "kledger-test", "AWS_SECRET_ACCESS_KEY": "kledger-test",
          "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL of a moto S3 server; its credentials and endpoint are in os.environ for
    the session (and so for the kledger processes the tests start)."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": endpoint})
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(params=["dir", "s3"])
def remote_url(request, tmp_path) -> str:
    """A URL where no remote exists yet: a missing directory, or a prefix in a new bucket of a real
    S3-compatible HTTP server (moto's standalone server on 127.0.0.1, one per test session). The S3
    kind is skipped where s3fs or moto is missing (the `remote` and `test` extras install them)."""
    if request.param == "dir":
        return str(tmp_path / "remote")
    request.getfixturevalue("s3_server")
    import s3fs

    bucket = f"kledger-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}/team/ledger"
