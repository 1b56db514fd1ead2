"""Packs: the objects of some commits as Parquet files, the unit a remote stores (kledger.remotes).

A pack is a directory of six Parquet files, written by DuckDB from the store, and `manifest.json`:

- `commits` (id, parents, message, author, timestamp, constraints, meta), parents first;
- `ops` (commit_id, pos, op, fact_id);
- `facts` (the stored columns of every fact the commits' ops name, less those the receiving side
  has already: the facts named by the commits it holds);
- `constraints` (the commits' measured keys and values per layer, with their fingerprint);
- `fingerprints` (id, body) of those constraints;
- `stats` (C0 by model, corpus and layer) the fingerprints name, unless the other side has them.

The manifest lists the commits in order, the C0 matrices with their checksums, and each file's
SHA-256 and size; the pack's id is the SHA-256 of the manifest's bytes. `read_pack` checks all of
it before anything is written: each file against the manifest, each commit's id against its
content (ops included), each fact's id against its fields, each commit's constraints against the
hash the commit records, each fingerprint's id against its body, each C0 matrix against its
checksum, and that every parent and fact a commit names is in the pack or already here.
`import_pack` then writes it in one transaction.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import IntegrityError
from ..records import Commit, Fact, Op, blob_digest, canonical_json, commit_id, constraint_digest, digests_hash, fact_id, sha256_hex, short
from .codec import constraint_shapes, fact_from_row, stats_key
from .sql import FACT_COLS

if TYPE_CHECKING:  # pragma: no cover
    from . import Store

PACK_FORMAT = "kledger-pack/1"
MANIFEST = "manifest.json"
TABLES = ("commits", "ops", "facts", "constraints", "fingerprints", "stats")
_IDS = "(SELECT id FROM pack_new)"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fingerprint_id(body: dict) -> str:
    """The id a fingerprint body hashes to (as kledger.edit.editor makes it)."""
    return sha256_hex("fingerprint\0" + canonical_json(body))


def _c0_of(bodies: list[str]) -> set[tuple[str, str]]:
    """(base model fingerprint, corpus fingerprint) of each fingerprint body (JSON text)."""
    out = set()
    for text in bodies:
        body = json.loads(text)
        corpus = (body.get("c0") or {}).get("corpus")
        if isinstance(body.get("base_model"), str) and isinstance(corpus, str):
            out.add((body["base_model"], corpus))
    return out


def write_pack(store: "Store", new: list[str], have: list[str], stats_have: set[tuple[str, str]],
               out: Path) -> tuple[str, dict]:
    """Write the pack of commits `new` (parents first) into the empty directory `out`, for a side
    that holds the commits `have` and the C0 of the (model, corpus) pairs `stats_have`. Returns
    (pack id, manifest)."""
    con = store.con
    con.execute("CREATE OR REPLACE TEMP TABLE pack_new AS SELECT unnest(?::VARCHAR[]) AS id", [new])
    con.execute("CREATE OR REPLACE TEMP TABLE pack_have AS SELECT unnest(?::VARCHAR[]) AS id", [have])
    try:
        fps = con.execute(f"SELECT id, body FROM fingerprints WHERE id IN (SELECT DISTINCT fingerprint FROM "
                          f"constraints WHERE commit_id IN {_IDS})").fetchall()
        pairs = sorted(_c0_of([b for _, b in fps]) - stats_have)
        con.execute("CREATE OR REPLACE TEMP TABLE pack_c0 AS SELECT unnest(?::VARCHAR[]) AS m, "
                    "unnest(?::VARCHAR[]) AS c", [[m for m, _ in pairs], [c for _, c in pairs]])
        queries = {
            "commits": f"SELECT id, parents, message, author, timestamp, constraints, meta FROM commits "
                       f"WHERE id IN {_IDS} ORDER BY seq",
            "ops": f"SELECT commit_id, pos, op, fact_id FROM commit_ops WHERE commit_id IN {_IDS} "
                   "ORDER BY commit_id, pos",
            "facts": f"SELECT {', '.join(FACT_COLS)} FROM facts WHERE id IN (SELECT fact_id FROM commit_ops "
                     f"WHERE commit_id IN {_IDS}) AND id NOT IN (SELECT fact_id FROM commit_ops WHERE commit_id IN "
                     "(SELECT id FROM pack_have)) ORDER BY id",
            "constraints": "SELECT commit_id, fact_id, layer, dtype, d_in, d_out, key, value, fingerprint "
                           f"FROM constraints WHERE commit_id IN {_IDS} ORDER BY commit_id, fact_id, layer",
            "fingerprints": f"SELECT id, body FROM fingerprints WHERE id IN (SELECT DISTINCT fingerprint FROM "
                            f"constraints WHERE commit_id IN {_IDS}) ORDER BY id",
            "stats": "SELECT model_fp, corpus_fp, layer, n_tokens, dtype, dim, matrix FROM stats s "
                     "SEMI JOIN pack_c0 p ON s.model_fp = p.m AND s.corpus_fp = p.c ORDER BY model_fp, corpus_fp, layer",
        }
        files = {}
        for name, sql in queries.items():
            path = out / f"{name}.parquet"
            con.execute(f"COPY ({sql}) TO '{_quote(path)}' (FORMAT parquet, COMPRESSION zstd)")
            rows = con.execute(f"SELECT count(*) FROM read_parquet('{_quote(path)}')").fetchone()[0]
            files[name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size, "rows": int(rows)}
        stats = [[m, c, int(la), store.meta(stats_key(m, c, la))] for m, c, la in con.execute(
            "SELECT model_fp, corpus_fp, layer FROM stats s SEMI JOIN pack_c0 p ON s.model_fp = p.m "
            "AND s.corpus_fp = p.c ORDER BY model_fp, corpus_fp, layer").fetchall()]
    finally:
        for t in ("pack_new", "pack_have", "pack_c0"):
            con.execute(f"DROP TABLE IF EXISTS {t}")
    manifest = {"format": PACK_FORMAT, "commits": list(new), "stats": stats, "files": files}
    text = canonical_json(manifest)
    (out / MANIFEST).write_text(text, encoding="utf-8")
    return sha256_hex(text), manifest


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")


@dataclass
class Pack:
    """A pack read and checked (`read_pack`), ready for `import_pack`."""

    commits: list[tuple[str, Commit]] = field(default_factory=list)
    facts: list[Fact] = field(default_factory=list)
    constraints: dict[str, list[tuple]] = field(default_factory=dict)  # commit → rows as stored
    fingerprints: dict[str, dict] = field(default_factory=dict)
    stats: list[tuple] = field(default_factory=list)  # rows as stored


def _bad(pack_id: str, what: str) -> IntegrityError:
    return IntegrityError(f"pack {short(pack_id)} is damaged: {what}; nothing was written",
                          "fetch again; if it persists, the remote's copy is damaged: push it again from a good ledger")


def read_manifest(pack_id: str, path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _bad(pack_id, f"its manifest cannot be read ({exc})") from None
    if sha256_hex(text) != pack_id:
        raise _bad(pack_id, "its manifest does not hash to its id")
    try:
        manifest = json.loads(text)
    except ValueError:
        raise _bad(pack_id, "its manifest is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
        raise _bad(pack_id, f"not a {PACK_FORMAT} manifest")
    return manifest


def _rows(store: "Store", pack_id: str, where: Path, manifest: dict) -> dict[str, list[tuple]]:
    """Each table's rows, once its file is checked against the manifest."""
    files = manifest.get("files") or {}
    for name in TABLES:
        meta, path = files.get(name) or {}, where / f"{name}.parquet"
        if not path.is_file() or path.stat().st_size != meta.get("bytes") or file_sha256(path) != meta.get("sha256"):
            raise _bad(pack_id, f"{name}.parquet is missing, truncated or altered")
    return {name: store.con.execute(f"SELECT * FROM read_parquet('{_quote(where / f'{name}.parquet')}')").fetchall()
            for name in TABLES}


def read_pack(store: "Store", pack_id: str, where: Path) -> Pack:
    """The pack in directory `where`, every object checked (see the module doc); an IntegrityError
    naming the first problem otherwise (also for files that match their manifest but do not hold
    what a pack holds)."""
    try:
        return _read_pack(store, pack_id, where)
    except IntegrityError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable Parquet, wrong columns or types, bad JSON
        raise _bad(pack_id, f"its contents cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None


def _read_pack(store: "Store", pack_id: str, where: Path) -> Pack:
    manifest = read_manifest(pack_id, where / MANIFEST)
    rows = _rows(store, pack_id, where, manifest)
    pack = Pack()
    ops: dict[str, list[tuple[int, str, str]]] = {}
    for cid, pos, op, fid in rows["ops"]:
        ops.setdefault(cid, []).append((pos, op, fid))
    known = set()
    for cid, parents, message, author, timestamp, constraints, meta in rows["commits"]:
        payload = {"parents": list(parents), "ops": [[op, fid] for _, op, fid in sorted(ops.get(cid, []))],
                   "message": message, "author": author, "timestamp": timestamp, "constraints": constraints,
                   "meta": json.loads(meta)}
        if commit_id(payload) != cid:
            raise _bad(pack_id, f"commit {short(cid)} does not match its id")
        missing = [p for p in parents if p not in known and not store.has_commit(p)]
        if missing:
            raise _bad(pack_id, f"commit {short(cid)}'s parent {short(missing[0])} is neither in it nor here")
        known.add(cid)
        pack.commits.append((cid, Commit(tuple(parents), tuple(Op(o, f) for o, f in payload["ops"]), message, author,
                                         timestamp, constraints, payload["meta"])))
    if [c for c, _ in pack.commits] != list(manifest.get("commits") or []):
        raise _bad(pack_id, "its commits are not those its manifest lists")
    for r in rows["facts"]:
        f = fact_from_row(r)
        if fact_id(f.to_dict()) != r[0]:
            raise _bad(pack_id, f"fact {short(r[0])} does not match its id")
        pack.facts.append(f)
    named = {fid for c in pack.commits for o in c[1].ops for fid in [o.fact_id]} - {f.id for f in pack.facts}
    absent = named - set(store.facts(named)) if named else set()
    if absent:
        raise _bad(pack_id, f"fact {short(sorted(absent)[0])} is neither in it nor here")
    for r in rows["constraints"]:
        pack.constraints.setdefault(r[0], []).append(_constraint_row(pack_id, r))
    for cid, c in pack.commits:
        digests = (constraint_digest(r[1], r[2], r[8], r[6], r[7]) for r in pack.constraints.get(cid, []))
        if digests_hash(digests) != c.constraints:
            raise _bad(pack_id, f"the constraints of commit {short(cid)} do not match its constraints hash")
    if set(pack.constraints) - known:
        raise _bad(pack_id, "it holds constraints of a commit it does not hold")
    for fid, body in rows["fingerprints"]:
        pack.fingerprints[fid] = json.loads(body)
        if fingerprint_id(pack.fingerprints[fid]) != fid:
            raise _bad(pack_id, f"fingerprint {short(fid)} does not match its body")
    digests = {(m, c, int(la)): d for m, c, la, d in manifest.get("stats") or []}
    for m, c, la, n_tokens, dtype, dim, blob in rows["stats"]:
        if digests.get((m, c, int(la))) != blob_digest(blob) or dtype != "float64" or len(blob) != 8 * dim * dim:
            raise _bad(pack_id, f"the C0 of layer {la} does not match its checksum")
        pack.stats.append((m, c, int(la), int(n_tokens), dtype, int(dim), blob))
    return pack


def _constraint_row(pack_id: str, r: tuple) -> tuple:
    """A constraints row as stored (float32 bytes: as many key rows of its stated width d_in as
    value rows of width d_out, one row per key reading: `codec.constraint_shapes`), checked."""
    _, fid, layer, dtype, d_in, d_out, key, value, fp = r
    try:
        whole = dtype == "float32" and d_in >= 1 and d_out >= 1 and bool(constraint_shapes(r))
    except IntegrityError:
        whole = False
    if not whole:
        raise _bad(pack_id, f"a constraint of fact {short(fid)} is not float32 vectors of its stated sizes")
    return r


def import_pack(store: "Store", pack: Pack) -> int:
    """Write a checked pack (in the caller's transaction), the vectors and C0 as the bytes they
    came in (no numpy); returns the number of new commits."""
    store.put_facts(pack.facts)
    new = 0
    for cid, c in pack.commits:
        if store.has_commit(cid):
            continue
        store.put_commit(c)
        if pack.constraints.get(cid):
            store.con.executemany("INSERT INTO constraints VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", pack.constraints[cid])
        new += 1
    for fid, body in pack.fingerprints.items():
        store.put_fingerprint(fid, body)
    have = set(store.stats_keys())
    for m, c, la, n_tokens, dtype, dim, blob in pack.stats:
        if (m, c, la) not in have:
            store.con.execute("INSERT INTO stats VALUES (?, ?, ?, ?, ?, ?, ?)", [m, c, la, n_tokens, dtype, dim, blob])
            store.set_meta(stats_key(m, c, la), blob_digest(blob))
    return new
