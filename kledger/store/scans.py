"""The store's full scans, for fsck: every fact with its stored matching keys, dangling ops and
staged ops, C0 matrices against their checksums. A mixin of `Store` (it uses its connection)."""

from __future__ import annotations

from typing import Iterator

from ..records import Fact, blob_digest
from .codec import fact_from_row, stats_key
from .sql import FACT_COLS


class Scans:
    def fact_rows(self) -> Iterator[tuple[str, Fact, tuple[str, str, str]]]:
        """Every fact: (stored id, the fact, its stored matching keys (subject, relation, object))."""
        cur = self.con.execute(f"SELECT {', '.join(FACT_COLS)}, subject_key, relation_key, object_key FROM facts")
        while batch := cur.fetchmany(5000):
            for r in batch:
                yield r[0], fact_from_row(r), (r[-3], r[-2], r[-1])

    def dangling_staged(self) -> list[str]:
        """Staged fact ids with no stored fact."""
        return [r[0] for r in self.con.execute(
            "SELECT fact_id FROM staged s WHERE NOT EXISTS (SELECT 1 FROM facts f WHERE f.id = s.fact_id) "
            "LIMIT 20").fetchall()]

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
