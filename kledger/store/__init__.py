"""DuckDB storage: schema, version, migrations, transactions. The only module that holds SQL.

Objects (facts, commits, their ops, constraints) are immutable and content-addressed; only refs,
HEAD, staging and pending operations change. Every write goes through `Store.transaction()`, so a
command that fails, or a process that dies half-way, leaves the ledger as it was.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import duckdb

from ..errors import RESTORE_HINT, IntegrityError, LedgerLocked, LedgerNotFound, SchemaError
from ..records import ById, Commit, Constraint, Fact, Op, blob_digest, normalize, relation_key, soft_key
from .chains import Chains
from .codec import constraint_from_row, decode, encode, fact_from_row, stats_key, vector_shape
from .scans import Scans
from .sql import COLUMNS, DERIVED, DERIVED_INDEXES, DERIVED_TABLES, FACT_COLS, MIGRATIONS, SCHEMA

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

SCHEMA_VERSION = 1
LEDGER_DIR = ".kledger"
DB_NAME = "ledger.duckdb"
STATS_CHECKSUMS = "stats_checksums"  # meta: "1" where every stored C0 matrix has a recorded checksum
REF_LOG = "ref_log"  # meta: branch → the commit kledger last moved it to

def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "lock" in text or "conflicting" in text


def _connect(db: Path, ledger_dir: Path | None = None, write: bool = True, wait: float = 0.0) -> duckdb.DuckDBPyConnection:
    """The one place connections are made: a connection to `db`, waiting up to `wait` seconds
    while another process holds the lock, with DuckDB's progress bar off."""
    ledger_dir = ledger_dir or db.parent
    deadline = time.monotonic() + wait
    while True:
        try:
            con = duckdb.connect(str(db), read_only=not write)
            break
        except duckdb.Error as exc:
            if not _is_lock_error(exc):
                raise SchemaError(f"cannot open the ledger database {db}: {str(exc).splitlines()[0]}",
                                  "the file is damaged or not a kledger ledger; restore it from a backup "
                                  "or re-create it with `kledger init --from`") from exc
            if time.monotonic() >= deadline:
                raise LedgerLocked(f"the ledger {ledger_dir} is in use by another process",
                                   "wait for the other kledger command to finish, then retry") from exc
            time.sleep(0.1)
    # DuckDB's Python client prints a progress bar on stdout for queries over 2 s (in sessions it
    # takes for interactive), which would break --json: off on every connection
    con.execute("SET enable_progress_bar = false")
    return con


class Store(Chains, Scans):
    """One open connection to a ledger database. Use as a context manager.

    Opened for reading, the store takes the shared lock only: other processes read at the same
    time. The caches a reader fills on the way (C0, the fingerprint memo: `set_meta`,
    `put_stats`, `put_fingerprint`) are kept in memory, visible to this store's reads, and
    written by `upgrade()`, which reopens the store for writing when a command has its result:
    a long command (commit measuring, apply, eval) never locks readers out while it works."""

    def __init__(self, con: duckdb.DuckDBPyConnection, path: Path, read_only: bool):
        self.con = con
        self.path = path
        self.read_only = read_only
        self.wait = 5.0
        self._deferred_meta: dict[str, str] = {}
        self._deferred_stats: dict[tuple[str, str, int], tuple[int, "np.ndarray"]] = {}
        self._deferred_fps: dict[str, dict] = {}
        self._in_tx = False

    # ----------------------------------------------------------------- opening and schema
    @classmethod
    def create(cls, ledger_dir: Path, meta: dict[str, str], wait: float = 5.0) -> "Store":
        ledger_dir.mkdir(parents=True, exist_ok=True)
        db = ledger_dir / DB_NAME
        tmp = ledger_dir / (DB_NAME + ".tmp")
        for p in (tmp, Path(str(tmp) + ".wal")):
            p.unlink(missing_ok=True)
        # Build the schema in a temporary file, then rename: a crash never leaves a half-made ledger,
        # and a failure leaves no temporary file either.
        try:
            con = _connect(tmp)
            try:
                con.execute("BEGIN")
                con.execute(SCHEMA)
                con.execute(DERIVED)
                rows = {"schema_version": str(SCHEMA_VERSION), STATS_CHECKSUMS: "1", REF_LOG: "{}", **meta}
                con.executemany("INSERT INTO meta VALUES (?, ?)", list(rows.items()))
                con.execute("COMMIT")
                con.execute("CHECKPOINT")
            finally:
                con.close()
            os.replace(tmp, db)
        except BaseException:
            for p in (tmp, Path(str(tmp) + ".wal")):
                p.unlink(missing_ok=True)
            raise
        return cls.open(ledger_dir, write=True, wait=wait)

    @classmethod
    def open(cls, ledger_dir: Path, write: bool = False, wait: float = 5.0) -> "Store":
        """Open for reading (shared) or writing (one writer), waiting up to `wait` seconds for a
        busy ledger."""
        db = ledger_dir / DB_NAME
        if not db.is_file():
            raise LedgerNotFound(f"no ledger database at {db}", "run `kledger init`")
        con = _connect(db, ledger_dir, write, wait)
        store = cls(con, ledger_dir, read_only=not write)
        store.wait = wait
        try:
            store._check_version(write)
            if write:
                store._record_legacy()
        except Exception:
            con.close()
            raise
        return store

    @property
    def deferred(self) -> bool:
        """Whether writes wait in memory for `upgrade()`."""
        return bool(self._deferred_meta or self._deferred_stats or self._deferred_fps)

    def upgrade(self) -> None:
        """Reopen for writing (waiting for the lock like `open`: LedgerLocked when it does not
        come) and write what was deferred while reading, in one transaction. A no-op for a
        store opened for writing. Call it outside a transaction."""
        if not self.read_only:
            return
        if self._in_tx:
            raise RuntimeError("upgrade() inside a transaction")
        self.con.close()
        self.con = _connect(self.path / DB_NAME, self.path, True, self.wait)
        self.read_only = False
        self._check_version(True)
        self._record_legacy()
        meta, stats, fps = self._deferred_meta, self._deferred_stats, self._deferred_fps
        self._deferred_meta, self._deferred_stats, self._deferred_fps = {}, {}, {}
        with self.transaction():
            for key, value in meta.items():
                self.set_meta(key, value)
            for (model_fp, corpus_fp, layer), (n, matrix) in stats.items():
                self.put_stats(model_fp, corpus_fp, layer, n, matrix)
            for fid, body in fps.items():
                self.put_fingerprint(fid, body)

    def _record_legacy(self) -> None:
        """Once, on a ledger made by a kledger that did not record them: the branches as they are
        (`ref_log`) and the C0 checksums (trust on first write, like a migration). Ledgers that
        record C0 checksums say so in meta `stats_checksums`; there a missing one is damage. And
        the DERIVED indexes and table, where a ledger from before them lacks them."""
        have = self.con.execute(
            "SELECT (SELECT count(*) FROM duckdb_tables() WHERE table_name = ANY(?::VARCHAR[]) "
            "AND database_name = current_database()) + (SELECT count(*) FROM duckdb_indexes() "
            "WHERE index_name = ANY(?::VARCHAR[]) AND database_name = current_database())",
            [list(DERIVED_TABLES), list(DERIVED_INDEXES)]).fetchone()[0]
        if have < len(DERIVED_TABLES) + len(DERIVED_INDEXES):
            with self.transaction():
                self.con.execute(DERIVED)
        if self.meta(REF_LOG) is None:  # a ledger from before the branch record: record the branches as they are
            with self.transaction():
                self.set_meta(REF_LOG, json.dumps(self.refs(), sort_keys=True))
        if self.meta(STATS_CHECKSUMS) is not None:
            return
        rows = self.con.execute(
            "SELECT model_fp, corpus_fp, layer, matrix FROM stats s WHERE NOT EXISTS (SELECT 1 FROM meta m WHERE "
            "m.key = 'stats_sha256:' || s.model_fp || ':' || s.corpus_fp || ':' || s.layer)").fetchall()
        with self.transaction():
            for model_fp, corpus_fp, layer, blob in rows:
                self.set_meta(stats_key(model_fp, corpus_fp, layer), blob_digest(blob))
            self.set_meta(STATS_CHECKSUMS, "1")

    def _check_version(self, write: bool) -> None:
        try:
            row = self.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except duckdb.Error as exc:
            raise SchemaError(f"{self.path} is not a kledger ledger (no meta table)",
                              "point --ledger at a directory made by `kledger init`") from exc
        version = int(row[0]) if row and row[0].strip().isdigit() else None
        if version is None or version < SCHEMA_VERSION and version not in MIGRATIONS:
            raise SchemaError(f"the ledger is damaged: its schema version {row[0] if row else None!r} is not one "
                              "kledger ever wrote", RESTORE_HINT)
        if version > SCHEMA_VERSION:
            raise SchemaError(f"this ledger has schema version {version}, newer than this kledger "
                              f"understands ({SCHEMA_VERSION})", "upgrade kledger to open it")
        if version < SCHEMA_VERSION:
            if not write:
                raise SchemaError(f"this ledger has the old schema version {version}",
                                  "run a command that writes, such as `kledger reset`, once to migrate it")
            self._migrate(version)
        self._check_tables()

    def _migrate(self, version: int) -> None:  # pragma: no cover - no older schema exists yet
        with self.transaction():
            while version < SCHEMA_VERSION:
                self.con.execute(MIGRATIONS[version])
                version += 1
            self.set_meta("schema_version", str(version))

    def _check_tables(self) -> None:
        """Every column of the schema is there: a missing table or column would fail a later query."""
        have = set(self.con.execute("SELECT table_name, column_name FROM duckdb_columns() "
                                    "WHERE database_name = current_database()").fetchall())
        for table, column in (tc for tc in COLUMNS if tc not in have):
            what = f"column {table}.{column}" if any(t == table for t, _ in have) else f"table {table!r}"
            raise SchemaError(f"the ledger is damaged: {what} is missing", RESTORE_HINT)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator["Store"]:
        """All-or-nothing. Nested calls join the outer transaction."""
        if self._in_tx:
            yield self
            return
        self.con.execute("BEGIN TRANSACTION")
        self._in_tx = True
        try:
            yield self
        except BaseException:
            self._in_tx = False
            self.con.execute("ROLLBACK")
            raise
        self._in_tx = False
        self.con.execute("COMMIT")

    # ----------------------------------------------------------------- meta, HEAD, refs
    def meta(self, key: str, default: str | None = None) -> str | None:
        if key in self._deferred_meta:
            return self._deferred_meta[key]
        row = self.con.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        if self.read_only:  # kept for upgrade()
            self._deferred_meta[key] = value
            return
        self.con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, value])

    def head(self) -> str:
        """'ref: NAME' when on a branch, else a commit id (detached)."""
        return self.meta("HEAD", "ref: main")

    def set_head(self, value: str) -> None:
        self.set_meta("HEAD", value)

    def ref(self, name: str) -> str | None:
        row = self.con.execute("SELECT commit_id FROM refs WHERE name = ?", [name]).fetchone()
        return row[0] if row else None

    def refs(self) -> dict[str, str]:
        return dict(self.con.execute("SELECT name, commit_id FROM refs ORDER BY name").fetchall())

    def set_ref(self, name: str, commit_id: str) -> None:
        self.con.execute("INSERT OR REPLACE INTO refs VALUES (?, ?)", [name, commit_id])
        self._record_ref(name, commit_id)

    def delete_ref(self, name: str) -> None:
        self.con.execute("DELETE FROM refs WHERE name = ?", [name])
        self._record_ref(name, None)

    def _record_ref(self, name: str, commit_id: str | None) -> None:
        """Every branch move kledger makes is also recorded in meta `ref_log`, so that fsck can
        tell a branch moved (rewound) outside kledger from one moved by a command."""
        log = self.ref_log()
        if commit_id is None:
            log.pop(name, None)
        else:
            log[name] = commit_id
        self.set_meta(REF_LOG, json.dumps(log, sort_keys=True))

    def ref_log(self) -> dict[str, str]:
        """branch → the commit kledger last moved it to (see `_record_ref`)."""
        try:
            log = json.loads(self.meta(REF_LOG) or "{}")
        except ValueError:
            return {}
        return log if isinstance(log, dict) else {}

    # ----------------------------------------------------------------- facts
    def put_facts(self, facts: Iterable[Fact]) -> None:
        uniq = {f.id: f for f in facts}
        if not uniq:
            return
        cols: list[list] = [[] for _ in range(12)]
        for fid, f in uniq.items():
            row = (fid, f.subject, f.prompt, f.target, f.relation, f.target_true, list(f.paraphrases),
                   list(f.neighborhood), json.dumps(f.extra, sort_keys=True, ensure_ascii=False),
                   normalize(f.subject), relation_key(f.relation), normalize(f.target))
            for c, v in zip(cols, row):
                c.append(v)
        types = ["VARCHAR[]"] * 6 + ["VARCHAR[][]"] * 2 + ["VARCHAR[]"] * 4
        select = ", ".join(f"unnest(?::{t})" for t in types)
        self.con.execute(f"INSERT OR IGNORE INTO facts SELECT {select}", cols)

    def facts(self, ids: Iterable[str]) -> dict[str, Fact]:
        ids = list(dict.fromkeys(ids))
        if not ids:
            return {}
        rows = self.con.execute(
            f"SELECT {', '.join(FACT_COLS)} FROM facts WHERE id IN (SELECT unnest(?::VARCHAR[]))",
            [ids]).fetchall()
        return ById("fact", ((r[0], fact_from_row(r)) for r in rows))

    def fact_ids_matching(self, subject: str | None, relation: str | None) -> set[str]:
        """Ids of facts whose subject and/or relation match (normalised)."""
        where, params = [], []
        if subject is not None:
            where.append("subject_key = ?")
            params.append(normalize(subject))
        if relation is not None:
            where.append("(relation_key = ? OR relation = ?)")
            params += [relation_key(relation), relation]
        sql = "SELECT id FROM facts" + (" WHERE " + " AND ".join(where) if where else "")
        return {r[0] for r in self.con.execute(sql, params).fetchall()}

    # ----------------------------------------------------------------- commits
    def put_commit(self, commit: Commit) -> str:
        """Store a commit; an identical one (same content, so same id) is already there."""
        cid = commit.id
        if self.has_commit(cid):
            return cid
        seq = self.con.execute("SELECT coalesce(max(seq), 0) + 1 FROM commits").fetchone()[0]
        self.con.execute(
            "INSERT INTO commits VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [cid, seq, list(commit.parents), commit.message, commit.author, commit.timestamp,
             commit.constraints, json.dumps(commit.meta, sort_keys=True, ensure_ascii=False)])
        if commit.ops:
            n = len(commit.ops)
            self.con.execute(
                "INSERT INTO commit_ops SELECT unnest(?::VARCHAR[]), unnest(?::INTEGER[]), "
                "unnest(?::VARCHAR[]), unnest(?::VARCHAR[])",
                [[cid] * n, list(range(n)), [o.op for o in commit.ops], [o.fact_id for o in commit.ops]])
        return cid

    def has_commit(self, cid: str) -> bool:
        return self.con.execute("SELECT 1 FROM commits WHERE id = ?", [cid]).fetchone() is not None

    def commit(self, cid: str) -> Commit:
        return self.commits([cid])[cid]

    def commits(self, ids: Iterable[str], with_ops: bool = True) -> dict[str, Commit]:
        ids = list(dict.fromkeys(ids))
        if not ids:
            return {}
        rows = self.con.execute(
            "SELECT id, parents, message, author, timestamp, constraints, meta FROM commits "
            "WHERE id = ANY(?::VARCHAR[])", [ids]).fetchall()
        ops: dict[str, list[Op]] = {}
        if with_ops:
            for cid, op, fid in self.con.execute(
                    "SELECT commit_id, op, fact_id FROM commit_ops WHERE commit_id = ANY(?::VARCHAR[]) "
                    "ORDER BY commit_id, pos", [ids]).fetchall():
                ops.setdefault(cid, []).append(Op(op, fid))
        return ById("commit", ((r[0], Commit(parents=tuple(r[1]), ops=tuple(ops.get(r[0], ())), message=r[2],
                                                author=r[3], timestamp=r[4], constraints=r[5], meta=json.loads(r[6])))
                                for r in rows))

    def graph(self) -> dict[str, tuple[str, ...]]:
        """commit id → parent ids, for every commit. Cheap: one small row per commit."""
        return ById("commit", ((cid, tuple(p)) for cid, p in self.con.execute("SELECT id, parents FROM commits").fetchall()))

    def commit_order(self) -> dict[str, int]:
        """commit id → insertion sequence (a topological order: parents are stored first)."""
        return ById("commit", self.con.execute("SELECT id, seq FROM commits").fetchall())

    def ids_with_prefix(self, prefix: str, limit: int = 3) -> list[str]:
        return [r[0] for r in self.con.execute(
            "SELECT id FROM commits WHERE starts_with(id, ?) ORDER BY id LIMIT ?", [prefix, limit]).fetchall()]

    def op_counts(self, ids: list[str]) -> dict[str, tuple[int, int]]:
        """commit id → (facts added, facts retracted)."""
        rows = self.con.execute(
            "SELECT commit_id, count(*) FILTER (WHERE op = 'add'), count(*) FILTER (WHERE op <> 'add') "
            "FROM commit_ops WHERE commit_id IN (SELECT unnest(?::VARCHAR[])) GROUP BY commit_id", [ids]).fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def commits_touching(self, fact_ids: set[str], commit_ids: list[str]) -> set[str]:
        if not fact_ids or not commit_ids:
            return set()
        return {r[0] for r in self.con.execute(
            "SELECT DISTINCT commit_id FROM commit_ops WHERE commit_id IN (SELECT unnest(?::VARCHAR[])) "
            "AND fact_id IN (SELECT unnest(?::VARCHAR[]))", [commit_ids, list(fact_ids)]).fetchall()}

    def ops_in(self, commit_ids: list[str]) -> list[tuple[str, str, str]]:
        """(fact id, commit id, op) of every op of these commits, in commit order then position."""
        return self.con.execute(
            "SELECT o.fact_id, o.commit_id, o.op FROM commit_ops o JOIN commits c ON c.id = o.commit_id "
            "WHERE o.commit_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY c.seq, o.pos", [commit_ids]).fetchall()

    # ----------------------------------------------------------------- staging
    def staged(self) -> list[Op]:
        return [Op(op, fid) for op, fid in
                self.con.execute("SELECT op, fact_id FROM staged ORDER BY pos").fetchall()]

    def stage(self, ops: list[Op]) -> None:
        if not ops:
            return
        start = self.con.execute("SELECT coalesce(max(pos), -1) + 1 FROM staged").fetchone()[0]
        n = len(ops)
        self.con.execute("INSERT INTO staged SELECT unnest(?::INTEGER[]), unnest(?::VARCHAR[]), unnest(?::VARCHAR[])",
                         [list(range(start, start + n)), [o.op for o in ops], [o.fact_id for o in ops]])

    def clear_staged(self, fact_ids: Iterable[str] | None = None) -> None:
        if fact_ids is None:
            self.con.execute("DELETE FROM staged")
        else:
            self.con.execute("DELETE FROM staged WHERE fact_id IN (SELECT unnest(?::VARCHAR[]))", [list(fact_ids)])

    # ----------------------------------------------------------------- relations
    def relations(self) -> dict[str, dict]:
        return {r[0]: {"multi": r[1], "inverse_of": r[2]} for r in
                self.con.execute("SELECT relation_key, multi, inverse_of FROM relations").fetchall()}

    def set_relation(self, key: str, multi: bool | None = None, inverse_of: str | None = None) -> None:
        cur = self.relations().get(key, {"multi": False, "inverse_of": None})
        self.con.execute("INSERT OR REPLACE INTO relations VALUES (?, ?, ?)",
                         [key, cur["multi"] if multi is None else multi,
                          cur["inverse_of"] if inverse_of is None else inverse_of])

    def unset_inverse(self, key: str) -> None:
        self.con.execute("UPDATE relations SET inverse_of = NULL WHERE relation_key = ?", [key])

    # ----------------------------------------------------------------- pending operation
    def pending(self) -> dict | None:
        row = self.con.execute("SELECT kind, body FROM pending").fetchone()
        return {"kind": row[0], **json.loads(row[1])} if row else None

    def set_pending(self, kind: str | None, body: dict | None = None) -> None:
        self.con.execute("DELETE FROM pending")
        if kind:
            self.con.execute("INSERT INTO pending VALUES (?, ?)", [kind, json.dumps(body or {}, sort_keys=True)])

    # ----------------------------------------------------------------- resolutions (rerere)
    def resolution(self, key: str) -> dict | None:
        row = self.con.execute("SELECT body FROM resolutions WHERE conflict_key = ?", [key]).fetchone()
        return json.loads(row[0]) if row else None

    def resolutions_of(self, keys: Iterable[str]) -> dict[str, dict]:
        """The recorded decisions on the conflicts `keys` (those that have one), in one query."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            return {}
        return {k: json.loads(b) for k, b in self.con.execute(
            "SELECT conflict_key, body FROM resolutions WHERE conflict_key IN (SELECT unnest(?::VARCHAR[]))",
            [keys]).fetchall()}

    def counts_in(self, commit_ids: list[str]) -> dict[str, int]:
        """commit id → the number of facts in force there, for those of `commit_ids` recorded
        (`put_count`); none on a ledger from before the record, opened for reading."""
        try:  # (the table is missing only on a store opened for reading, never inside a transaction,
            # which the CatalogException would abort; a write open makes it first)
            return dict(self.con.execute("SELECT commit_id, n FROM in_force_counts "
                                         "WHERE commit_id = ANY(?::VARCHAR[])", [commit_ids]).fetchall())
        except duckdb.CatalogException:
            return {}

    def put_count(self, commit_id: str, n: int) -> None:
        self.con.execute("INSERT OR REPLACE INTO in_force_counts VALUES (?, ?)", [commit_id, n])

    def rules_digest(self) -> str:
        """A hash of the relation rules (multi-valued relations, inverse pairs): what decides which
        facts can contradict each other."""
        rows = self.con.execute("SELECT relation_key, multi, inverse_of FROM relations ORDER BY relation_key").fetchall()
        return blob_digest(json.dumps(rows).encode())[:16]

    def candidates_recorded(self, commit_id: str, rules: str) -> list[str] | None:
        """The conflict candidates recorded at `commit_id` under the rules `rules` (None: none
        recorded, or recorded under other rules, or a ledger from before the record)."""
        try:  # (missing only on a store opened for reading: see counts_in)
            row = self.con.execute("SELECT fact_ids FROM candidates_at WHERE commit_id = ? AND rules = ?",
                                   [commit_id, rules]).fetchone()
        except duckdb.CatalogException:
            return None
        return None if row is None else list(row[0])

    def put_candidates(self, commit_id: str, rules: str, fact_ids: list[str]) -> None:
        self.con.execute("INSERT OR REPLACE INTO candidates_at VALUES (?, ?, ?)", [commit_id, rules, fact_ids])

    def put_resolution(self, key: str, body: dict, created: str) -> None:
        self.con.execute("INSERT OR REPLACE INTO resolutions VALUES (?, ?, ?)",
                         [key, json.dumps(body, sort_keys=True), created])

    def resolutions_with_prefix(self, prefix: str) -> list[str]:
        return [r[0] for r in self.con.execute(
            "SELECT conflict_key FROM resolutions WHERE starts_with(conflict_key, ?) ORDER BY conflict_key",
            [prefix]).fetchall()]

    def delete_resolution(self, key: str) -> None:
        self.con.execute("DELETE FROM resolutions WHERE conflict_key = ?", [key])

    def resolutions(self) -> list[tuple[str, dict, str]]:
        """Every recorded decision: (conflict key, body, created), by key."""
        return [(k, json.loads(b), c) for k, b, c in self.con.execute(
            "SELECT conflict_key, body, created FROM resolutions ORDER BY conflict_key").fetchall()]

    # ----------------------------------------------------------------- constraints and stats
    def put_fingerprint(self, fid: str, body: dict) -> None:
        if self.read_only:  # kept for upgrade()
            self._deferred_fps[fid] = body
            return
        self.con.execute("INSERT OR IGNORE INTO fingerprints VALUES (?, ?)", [fid, json.dumps(body, sort_keys=True)])

    def fingerprint(self, fid: str) -> dict | None:
        if fid in self._deferred_fps:
            return self._deferred_fps[fid]
        row = self.con.execute("SELECT body FROM fingerprints WHERE id = ?", [fid]).fetchone()
        return json.loads(row[0]) if row else None

    def put_constraints(self, commit_id: str, constraints: Iterable[Constraint]) -> None:
        """Store a commit's constraints (key and value as little-endian float32 bytes; a fact's
        readings, [R, d], as R rows of the stated width d_in / d_out one after another)."""
        rows = []
        for c in constraints:
            dtype, _, key = encode(c.key)
            _, _, value = encode(c.value)
            d_in, d_out = int(c.key.shape[-1]), int(c.value.shape[-1])
            rows.append((commit_id, c.fact_id, int(c.layer), dtype, d_in, d_out, key, value, c.fingerprint))
        if rows:
            self.con.executemany("INSERT INTO constraints VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def constraints(self, commit_ids: Iterable[str]) -> list[Constraint]:
        """The constraints those commits measured, ordered by commit, fact and layer."""
        return self._constraints_where("commit_id", commit_ids, "commit_id, fact_id, layer")

    def constraints_for_facts(self, fact_ids: Iterable[str]) -> list[Constraint]:
        """Every stored constraint of those facts, from any commit, ordered by fact and layer."""
        return self._constraints_where("fact_id", fact_ids, "fact_id, layer, commit_id")

    def _constraints_where(self, column: str, ids: Iterable[str], order: str) -> list[Constraint]:
        ids = list(ids)
        if not ids:
            return []
        return [constraint_from_row(r) for r in self.con.execute(
            "SELECT commit_id, fact_id, layer, dtype, d_in, d_out, key, value, fingerprint FROM constraints "
            f"WHERE {column} IN (SELECT unnest(?::VARCHAR[])) ORDER BY {order}", [ids]).fetchall()]

    def measured_facts(self, fact_ids: Iterable[str]) -> set[str]:
        """Those of `fact_ids` that some commit has measured constraints for."""
        fact_ids = list(fact_ids)
        if not fact_ids:
            return set()
        return {r[0] for r in self.con.execute(
            "SELECT DISTINCT fact_id FROM constraints WHERE fact_id IN (SELECT unnest(?::VARCHAR[]))",
            [fact_ids]).fetchall()}

    def measured_in(self, fact_ids: Iterable[str]) -> dict[str, set[str]]:
        """fact id → the commits that measured constraints for it (without loading the vectors)."""
        out: dict[str, set[str]] = {}
        fact_ids = list(fact_ids)
        if fact_ids:
            for cid, fid in self.con.execute(
                    "SELECT DISTINCT commit_id, fact_id FROM constraints WHERE fact_id IN "
                    "(SELECT unnest(?::VARCHAR[]))", [fact_ids]).fetchall():
                out.setdefault(fid, set()).add(cid)
        return out

    def first_layer_keys(self, fact_ids: Iterable[str]) -> dict[str, "np.ndarray"]:
        """fact id → its key at the lowest layer any constraint is stored for (the first edited
        layer; of a fact's key readings, the prefixed one: `records.soft_key`), for each of those facts
        that has stored constraints, from one of the commits that measured it: keys there depend
        only on the unedited layers below, so they agree."""
        fact_ids = list(fact_ids)
        if not fact_ids:
            return {}
        rows = self.con.execute(
            "WITH c AS (SELECT * FROM constraints WHERE fact_id IN (SELECT unnest(?::VARCHAR[]))), "
            "low AS (SELECT min(layer) AS layer FROM c) "
            "SELECT fact_id, arg_max(dtype, commit_id), arg_max(d_in, commit_id), arg_max(key, commit_id) "
            "FROM c WHERE layer = (SELECT layer FROM low) GROUP BY fact_id ORDER BY fact_id",
            [fact_ids]).fetchall()
        return {f: soft_key(decode(blob, dt, vector_shape(blob, dt, n))) for f, dt, n, blob in rows}

    def stats(self, model_fp: str, corpus_fp: str) -> dict[int, tuple[int, "np.ndarray"]]:
        """C0 by layer for that base model and corpus: layer → (tokens it was measured over, the
        [d, d] matrix)."""
        rows = self.con.execute(
            "SELECT layer, n_tokens, dtype, dim, matrix FROM stats WHERE model_fp = ? AND corpus_fp = ? "
            "ORDER BY layer", [model_fp, corpus_fp]).fetchall()
        for la, _n, _dt, _d, blob in rows:
            recorded = self.meta(stats_key(model_fp, corpus_fp, la))
            if recorded is not None and recorded != blob_digest(blob):
                raise IntegrityError(f"the stored C0 of layer {la} does not match its checksum (the ledger was damaged or edited)",
                                     "run `kledger fsck`, and restore the ledger from a backup or a text export")
        out = {la: (n, decode(blob, dt, (d, d))) for la, n, dt, d, blob in rows}
        out.update({la: got for (m, c, la), got in self._deferred_stats.items() if (m, c) == (model_fp, corpus_fp)})
        return dict(sorted(out.items()))

    def put_stats(self, model_fp: str, corpus_fp: str, layer: int, n_tokens: int, matrix: "np.ndarray") -> None:
        """Store C0 of one layer (as float64)."""
        if self.read_only:  # kept for upgrade()
            self._deferred_stats[(model_fp, corpus_fp, int(layer))] = (n_tokens, matrix.copy())
            return
        dtype, _, blob = encode(matrix, "<f8")
        self.con.execute("DELETE FROM stats WHERE model_fp = ? AND corpus_fp = ? AND layer = ?",
                         [model_fp, corpus_fp, layer])
        self.con.execute("INSERT INTO stats VALUES (?, ?, ?, ?, ?, ?, ?)",
                         [model_fp, corpus_fp, layer, n_tokens, dtype, int(matrix.shape[0]), blob])
        self.set_meta(stats_key(model_fp, corpus_fp, layer), blob_digest(blob))
