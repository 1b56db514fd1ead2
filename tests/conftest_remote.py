"""Helpers that read and write a remote's objects the same way for both kinds of remote (a
directory, S3 through fsspec), for the tests that damage or inspect a remote. The fixtures that
make the remotes (`remote_url`, `s3_server`) are in conftest.py."""

from __future__ import annotations

from pathlib import Path

from kledger.remote_kinds import open_remote


# ------------------------------------------------------------------ a remote's objects, either kind
def refs(url: str) -> dict:
    return open_remote(url).read_refs()[1]


def _fs(url: str):
    r = open_remote(url)
    if hasattr(r, "fs"):
        return r.fs, r._p
    return None, lambda *parts: str(Path(r.root, *parts))


def read(url: str, *parts: str) -> bytes:
    fs, p = _fs(url)
    return fs.cat_file(p(*parts)) if fs else Path(p(*parts)).read_bytes()


def write(url: str, data: bytes, *parts: str) -> None:
    fs, p = _fs(url)
    if fs:
        fs.pipe_file(p(*parts), data)
    else:
        Path(p(*parts)).parent.mkdir(parents=True, exist_ok=True)
        Path(p(*parts)).write_bytes(data)


def delete(url: str, *parts: str) -> None:
    fs, p = _fs(url)
    if fs:
        fs.rm_file(p(*parts))
    else:
        Path(p(*parts)).unlink()


def names(url: str, *parts: str) -> list[str]:
    """The names of the objects under a prefix (a directory's files)."""
    fs, p = _fs(url)
    if fs:
        fs.invalidate_cache()
        return sorted(n.rsplit("/", 1)[-1] for n in fs.ls(p(*parts), detail=False))
    return sorted(q.name for q in Path(p(*parts)).iterdir())


def size(url: str, *parts: str) -> int:
    return len(read(url, *parts))
