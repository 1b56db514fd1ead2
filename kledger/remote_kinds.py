"""The kinds of remote (see kledger.remotes for the layout they share and the guarantees).

- `DirRemote`: a directory on a local disk or a network mount (a path, or `file://PATH`). A pack is
  copied under a temporary name and renamed into place; the next refs version is created with a
  hard link, which fails when the file exists (compare-and-swap).
- `FsRemote`: any other fsspec URL, such as `s3://bucket/prefix` (the `remote` extra: fsspec and
  s3fs). Objects cannot be renamed there, so a pack's manifest is written last and a pack counts as
  present only once its manifest is; the next refs version is written with a conditional write
  (fsspec's `mode="create"`, S3's `If-None-Match: *`), which fails when the object exists.
  Credentials and the endpoint come from the usual places (for S3: `AWS_ACCESS_KEY_ID`,
  `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, ~/.aws), read by the storage library, not kledger.

Both have: `exists`, `create`, `read_refs`, `swap_refs`, `has_pack`, `put_pack`, `get_pack`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import InputError, IntegrityError, KledgerError, RemoteError
from .history import check_branch_name
from .store.packs import MANIFEST, TABLES

REMOTE_FORMAT = "kledger-remote/1"
REFS_FORMAT = "kledger-remote-refs/1"
MARKER = "kledger-remote.json"
PACK_FILES = (*(f"{t}.parquet" for t in TABLES), MANIFEST)  # the manifest last: it marks a complete pack


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _check_refs(url: str, doc: Any) -> dict:
    """The refs document, its shape checked: what it names becomes paths and refs here."""
    def bad(what: str) -> IntegrityError:
        return IntegrityError(f"the refs of remote {url} are damaged: {what}", "check the remote, or push to it again "
                              "from a good ledger")

    if not isinstance(doc, dict) or doc.get("format") != REFS_FORMAT:
        raise InputError(f"the refs of remote {url} are not a {REFS_FORMAT} document", "check the remote's URL")
    branches, packs = doc.get("branches"), doc.get("packs") or []
    if not isinstance(branches, dict) or not isinstance(packs, list):
        raise bad("'branches' must be an object and 'packs' a list")
    for name, cid in branches.items():
        try:
            check_branch_name(name)
        except KledgerError:
            raise bad(f"{str(name)[:40]!r} is not a branch name") from None
        if not isinstance(cid, str) or not _HEX64.fullmatch(cid):
            raise bad(f"branch {name!r} does not name a commit id")
    if not all(isinstance(p, str) and _HEX64.fullmatch(p) for p in packs):
        raise bad("a pack id is not 64 hex digits")
    stats = doc.get("stats") or []
    if not isinstance(stats, list) or not all(isinstance(x, list) and len(x) == 2 and all(isinstance(v, str) for v in x)
                                              for x in stats):
        raise bad("'stats' must be a list of [model, corpus] pairs")
    if not isinstance(doc.get("setup") or {}, dict):
        raise bad("'setup' must be an object")
    return doc


def _not_a_remote(url: str) -> InputError:
    return InputError(f"{url} is not a kledger remote (no {MARKER})", "check the URL, or push to a new location to make one")


def _not_empty(url: str) -> InputError:
    return InputError(f"{url} is not a kledger remote and is not empty",
                      "give a new or empty location, or the URL of an existing remote")


@contextlib.contextmanager
def _io(url: str) -> Iterator[None]:
    """Storage failures as one-line RemoteErrors."""
    try:
        yield
    except KledgerError:
        raise
    except Exception as exc:  # noqa: BLE001 - a storage library's error, whatever its class
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise RemoteError(f"remote {url}: {text}", "check the URL, the credentials and that the location "
                          "can be reached") from None


class DirRemote:
    """A remote that is a directory (see the module doc)."""

    def __init__(self, url: str):
        self.url = url
        self.root = Path(url.removeprefix("file://")).expanduser().resolve()

    def exists(self) -> bool:
        return (self.root / MARKER).is_file()

    def create(self) -> None:
        """Make an empty remote in a missing or empty directory."""
        if self.root.exists() and (not self.root.is_dir() or any(self.root.iterdir())):
            raise _not_empty(self.url)
        with _io(self.url):
            (self.root / "packs").mkdir(parents=True, exist_ok=True)
            (self.root / "refs").mkdir(exist_ok=True)
            (self.root / MARKER).write_text(json.dumps({"format": REMOTE_FORMAT}) + "\n")

    def read_refs(self) -> tuple[int, dict | None]:
        """(version, refs document) — (0, None) for a remote nobody pushed to yet."""
        if not self.exists():
            raise _not_a_remote(self.url)
        versions = [int(p.stem) for p in (self.root / "refs").glob("*.json") if p.stem.isdigit()]
        if not versions:
            return 0, None
        v = max(versions)
        try:
            doc = json.loads((self.root / "refs" / f"{v:012d}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"the refs of remote {self.url} cannot be read ({exc})", "check the remote") from None
        return v, _check_refs(self.url, doc)

    def swap_refs(self, version: int, doc: dict) -> bool:
        """Write `doc` as version `version + 1` unless another writer got there first (False)."""
        with _io(self.url):
            return self._swap(version, doc)

    def _swap(self, version: int, doc: dict) -> bool:
        refs = self.root / "refs"
        fd, tmp = tempfile.mkstemp(prefix=".refs-", dir=refs)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, refs / f"{version + 1:012d}.json")
            except FileExistsError:
                return False
            return True
        finally:
            os.unlink(tmp)

    def has_pack(self, pack_id: str) -> bool:
        return (self.root / "packs" / pack_id / MANIFEST).is_file()

    def put_pack(self, pack_id: str, src: Path, between: Callable[[], None] | None = None) -> int:
        """Copy the pack in `src` in (under a temporary name, renamed when complete); returns the
        bytes written (0 when it was there already). `between` is called after the first file
        (fault injection)."""
        with _io(self.url):
            return self._put(pack_id, src, between)

    def _put(self, pack_id: str, src: Path, between: Callable[[], None] | None) -> int:
        final = self.root / "packs" / pack_id
        if self.has_pack(pack_id):
            return 0
        tmp = Path(tempfile.mkdtemp(prefix=f".{pack_id[:12]}-", dir=self.root / "packs"))
        try:
            n = 0
            for i, p in enumerate(sorted(src.iterdir())):
                shutil.copyfile(p, tmp / p.name)
                n += p.stat().st_size
                if i == 0 and between is not None:
                    between()
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if self.has_pack(pack_id):  # another push brought the same pack
                return 0
            raise
        return n

    def get_pack(self, pack_id: str, dst: Path) -> int:
        """Copy a pack's files into the empty directory `dst`; returns the bytes read."""
        src = self.root / "packs" / pack_id
        n = 0
        with _io(self.url):
            for name in PACK_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, dst / name)
                    n += (dst / name).stat().st_size
        return n


class FsRemote:
    """A remote at an fsspec URL (see the module doc)."""

    def __init__(self, url: str):
        try:
            import fsspec
        except ImportError:
            raise RemoteError(f"remote {url!r} needs fsspec, which is not installed",
                              "install it with: pip install 'kledger[remote]'") from None
        self.url = url.rstrip("/")
        with _io(self.url):
            self.fs, self.root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True)

    def _p(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def exists(self) -> bool:
        with _io(self.url):
            self.fs.invalidate_cache()
            return bool(self.fs.exists(self._p(MARKER)))

    def create(self) -> None:
        with _io(self.url):
            if self.fs.exists(self.root) and self.fs.ls(self.root, detail=False):
                raise _not_empty(self.url)
            self.fs.pipe_file(self._p(MARKER), (json.dumps({"format": REMOTE_FORMAT}) + "\n").encode())

    def read_refs(self) -> tuple[int, dict | None]:
        if not self.exists():
            raise _not_a_remote(self.url)
        with _io(self.url):
            try:
                names = self.fs.ls(self._p("refs"), detail=False)
            except FileNotFoundError:
                names = []
            versions = [int(s) for s in (n.rsplit("/", 1)[-1].removesuffix(".json") for n in names) if s.isdigit()]
            if not versions:
                return 0, None
            v = max(versions)
            try:
                doc = json.loads(self.fs.cat_file(self._p("refs", f"{v:012d}.json")))
            except ValueError:
                doc = None
        return v, _check_refs(self.url, doc)

    def swap_refs(self, version: int, doc: dict) -> bool:
        data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
        with _io(self.url):
            try:
                self.fs.pipe_file(self._p("refs", f"{version + 1:012d}.json"), data, mode="create")
            except FileExistsError:
                return False
            return True

    def has_pack(self, pack_id: str) -> bool:
        with _io(self.url):
            return bool(self.fs.exists(self._p("packs", pack_id, MANIFEST)))

    def put_pack(self, pack_id: str, src: Path, between: Callable[[], None] | None = None) -> int:
        """Upload the pack's files, the manifest last; returns the bytes written (0 when it was
        there already). `between` is called after the first file (fault injection)."""
        if self.has_pack(pack_id):
            return 0
        n = 0
        with _io(self.url):
            for i, name in enumerate(PACK_FILES):
                self.fs.put_file(str(src / name), self._p("packs", pack_id, name))
                n += (src / name).stat().st_size
                if i == 0 and between is not None:
                    between()
        return n

    def get_pack(self, pack_id: str, dst: Path) -> int:
        n = 0
        with _io(self.url):
            for name in PACK_FILES:
                try:
                    self.fs.get_file(self._p("packs", pack_id, name), str(dst / name))
                except FileNotFoundError:
                    continue  # read_pack names what is missing
                n += (dst / name).stat().st_size
        return n


def open_remote(url: str) -> Any:
    """The remote at `url`: a DirRemote for a path or file://, an FsRemote for another scheme."""
    if not isinstance(url, str) or not url.strip():
        raise InputError("empty remote URL", "give a directory path or a URL such as s3://bucket/prefix")
    if "://" in url and not url.startswith("file://"):
        return FsRemote(url)
    return DirRemote(url)
