"""The store's full scans, for fsck: every fact with its stored matching keys, dangling ops and
staged ops, C0 matrices against their checksums. A mixin of `Store` (it uses its connection)."""

from __future__ import annotations

import json
from typing import Iterator

from ..records import Fact, blob_digest
from .codec import fact_from_row, stats_key
from .sql import FACT_COLS


class Scans:
    def fact_rows(self, ids: list[str] | None = None) -> Iterator[tuple[str, Fact, tuple[str, str, str]]]:
        """Every fact (or those `ids`): (stored id, the fact, its stored matching keys (subject,
        relation, object))."""
        sql = f"SELECT {', '.join(FACT_COLS)}, subject_key, relation_key, object_key FROM facts"
        cur = self.con.execute(sql) if ids is None else self.con.execute(sql + " WHERE id = ANY(?::VARCHAR[])", [ids])
        while batch := cur.fetchmany(5000):
            for r in batch:
                yield r[0], fact_from_row(r), (r[-3], r[-2], r[-1])

    def fact_hashes(self) -> Iterator[tuple[str, str, str]]:
        """Every fact as (stored id, its content as DuckDB writes it in JSON with sorted keys and no
        spaces, its stored `extra` text). The JSON is the canonical form ids are hashed over
        (records.canonical_json) except in rare spellings (numbers in `extra` such as 1e+20,
        upper-case \\u escapes): a row whose text does not hash to its id is to be checked again
        from the fact itself. DuckDB reads JSON more leniently than Python (a trailing comma, for
        one), so the caller also parses `extra` as every command will."""
        cur = self.con.execute(
            "SELECT id, json_object('extra', json(extra), 'neighborhood', neighborhood, 'paraphrases', paraphrases, "
            "'prompt', prompt, 'relation', relation, 'subject', subject, 'target', target, "
            "'target_true', target_true)::VARCHAR, extra FROM facts")
        while batch := cur.fetchmany(20000):
            yield from batch

    def key_pairs(self) -> Iterator[tuple[str, str, str]]:
        """The distinct (column, text, stored matching key) pairs of the facts' subjects,
        relations and objects: one row per distinct pair, not per fact."""
        yield from self.con.execute(
            "SELECT DISTINCT 'subject', subject, subject_key FROM facts UNION ALL "
            "SELECT DISTINCT 'relation', relation, relation_key FROM facts UNION ALL "
            "SELECT DISTINCT 'target', target, object_key FROM facts").fetchall()

    def facts_with_key(self, column: str, text: str, key: str) -> list[str]:
        """Ids of the facts whose `column` (subject, relation or target) is `text` with stored key `key`."""
        key_col = {"subject": "subject_key", "relation": "relation_key", "target": "object_key"}[column]
        return [r[0] for r in self.con.execute(
            f"SELECT id FROM facts WHERE {column} = ? AND {key_col} = ? ORDER BY id", [text, key]).fetchall()]

    def dangling_staged(self) -> list[str]:
        """Staged fact ids with no stored fact."""
        return [r[0] for r in self.con.execute(
            "SELECT fact_id FROM staged s WHERE NOT EXISTS (SELECT 1 FROM facts f WHERE f.id = s.fact_id) "
            "LIMIT 20").fetchall()]

    def stats_keys(self) -> list[tuple[str, str, int]]:
        """(model fingerprint, corpus fingerprint, layer) of every stored C0 matrix."""
        return [(m, c, int(la)) for m, c, la in self.con.execute(
            "SELECT model_fp, corpus_fp, layer FROM stats ORDER BY ALL").fetchall()]

    def stats_problems(self) -> list[str]:
        """Stored C0 matrices whose bytes do not match the checksum recorded with them."""
        out = []
        for model_fp, corpus_fp, layer, blob in self.con.execute(
                "SELECT model_fp, corpus_fp, layer, matrix FROM stats ORDER BY model_fp, corpus_fp, layer").fetchall():
            recorded = self.meta(stats_key(model_fp, corpus_fp, layer))
            if recorded is None:
                out.append(f"C0 of layer {layer} (model {model_fp[:10]}) has no recorded checksum")
            elif recorded != blob_digest(blob):
                out.append(f"C0 of layer {layer} (model {model_fp[:10]}) does not match its checksum")
        return out

    def dangling_ops(self) -> list[tuple[str, str]]:
        return self.con.execute(
            "SELECT commit_id, fact_id FROM commit_ops o WHERE NOT EXISTS "
            "(SELECT 1 FROM facts f WHERE f.id = o.fact_id) LIMIT 20").fetchall()

    def commit_payloads(self) -> Iterator[tuple[str, dict]]:
        """Every commit as (stored id, the payload its id is hashed over: records.Commit.payload),
        its ops gathered in the same query, without building a Commit per row."""
        cur = self.con.execute(
            "SELECT c.id, c.parents, c.message, c.author, c.timestamp, c.constraints, c.meta, "
            "(SELECT list([o.op, o.fact_id] ORDER BY o.pos) FROM commit_ops o WHERE o.commit_id = c.id) FROM commits c")
        while batch := cur.fetchmany(5000):
            for cid, parents, message, author, timestamp, constraints, meta, ops in batch:
                yield cid, {"parents": list(parents), "ops": ops or [], "message": message, "author": author,
                            "timestamp": timestamp, "constraints": constraints, "meta": json.loads(meta)}
