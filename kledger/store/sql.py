"""The SQL text of the store: the schema, its migrations and the shared query fragments
(kledger.store runs them)."""

import re

SCHEMA = """
CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
CREATE TABLE facts (
    id VARCHAR PRIMARY KEY, subject VARCHAR NOT NULL, prompt VARCHAR NOT NULL,
    target VARCHAR NOT NULL, relation VARCHAR NOT NULL, target_true VARCHAR,
    paraphrases VARCHAR[] NOT NULL, neighborhood VARCHAR[] NOT NULL, extra VARCHAR NOT NULL,
    subject_key VARCHAR NOT NULL, relation_key VARCHAR NOT NULL, object_key VARCHAR NOT NULL);
CREATE TABLE commits (
    id VARCHAR PRIMARY KEY, seq BIGINT NOT NULL, parents VARCHAR[] NOT NULL,
    message VARCHAR NOT NULL, author VARCHAR NOT NULL, timestamp VARCHAR NOT NULL,
    constraints VARCHAR, meta VARCHAR NOT NULL);
CREATE TABLE commit_ops (commit_id VARCHAR NOT NULL, pos INTEGER NOT NULL, op VARCHAR NOT NULL,
    fact_id VARCHAR NOT NULL);
CREATE TABLE refs (name VARCHAR PRIMARY KEY, commit_id VARCHAR NOT NULL);
CREATE TABLE staged (pos INTEGER NOT NULL, op VARCHAR NOT NULL, fact_id VARCHAR NOT NULL);
-- Per-fact, per-layer (key, value) constraints computed by a commit (the edit engine). Vectors are
-- raw little-endian bytes of `dtype`; `fingerprint` names the row of `fingerprints` they depend on.
CREATE TABLE constraints (commit_id VARCHAR NOT NULL, fact_id VARCHAR NOT NULL, layer INTEGER NOT NULL,
    dtype VARCHAR NOT NULL, d_in INTEGER NOT NULL, d_out INTEGER NOT NULL,
    key BLOB NOT NULL, value BLOB NOT NULL, fingerprint VARCHAR NOT NULL);
CREATE TABLE fingerprints (id VARCHAR PRIMARY KEY, body VARCHAR NOT NULL);
-- Cached statistics (C0 per model, layer and corpus).
CREATE TABLE stats (model_fp VARCHAR NOT NULL, corpus_fp VARCHAR NOT NULL, layer INTEGER NOT NULL,
    n_tokens BIGINT NOT NULL, dtype VARCHAR NOT NULL, dim INTEGER NOT NULL, matrix BLOB NOT NULL);
-- Relation declarations: multi-valued relations and inverse pairs.
CREATE TABLE relations (relation_key VARCHAR PRIMARY KEY, multi BOOLEAN NOT NULL DEFAULT FALSE,
    inverse_of VARCHAR);
-- An operation stopped by conflicts (merge, cherry-pick): at most one row.
CREATE TABLE pending (kind VARCHAR NOT NULL, body VARCHAR NOT NULL);
-- Recorded conflict decisions, replayed when the same conflict comes back (like git rerere).
CREATE TABLE resolutions (conflict_key VARCHAR PRIMARY KEY, body VARCHAR NOT NULL, created VARCHAR NOT NULL);
"""

# Derived from the tables above (fsck checks the records at HEAD and the branch tips), so not part of
# the schema version: made with a new ledger, and on a ledger from before them when it is first opened for writing
# (readers of such a ledger work without them). Indexes for the reads that follow one change (the
# ops of a few facts, the facts about a few subjects or objects); per commit, the number of facts in
# force (so that `status` does not count them over the whole chain) and the facts in force there
# that can take part in a contradiction under the relation rules `rules` names (so that `check`
# looks at those and at what changed since, not at every fact in force).
DERIVED = """
CREATE INDEX IF NOT EXISTS commit_ops_fact ON commit_ops (fact_id);
CREATE INDEX IF NOT EXISTS commit_ops_commit ON commit_ops (commit_id);
CREATE INDEX IF NOT EXISTS facts_subject ON facts (subject_key);
CREATE INDEX IF NOT EXISTS facts_object ON facts (object_key);
CREATE TABLE IF NOT EXISTS in_force_counts (commit_id VARCHAR PRIMARY KEY, n BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates_at (commit_id VARCHAR PRIMARY KEY, rules VARCHAR NOT NULL,
    fact_ids VARCHAR[] NOT NULL);
"""
DERIVED_TABLES = tuple(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", DERIVED))
DERIVED_INDEXES = tuple(re.findall(r"CREATE INDEX IF NOT EXISTS (\w+)", DERIVED))

MIGRATIONS: dict[int, str] = {}  # from each older schema version, the SQL that brings it up one; none yet
# (table, column) of every column in the schema, checked when a ledger is opened
COLUMNS = [(t, c) for t, body in re.findall(r"CREATE TABLE (\w+) \((.*?)\);", SCHEMA, re.S)
           for c in re.findall(r"(?:^|,)\s*(\w+) (?:VARCHAR|INTEGER|BIGINT|BLOB|BOOLEAN)", body)]

FACT_COLS = ("id", "subject", "prompt", "target", "relation", "target_true", "paraphrases",
              "neighborhood", "extra")


# The facts in force at chain[0] given its first-parent chain (params: chain, chain, 'add'):
# `in_force(id, commit_id)`. An op in a newer commit wins; within a commit, a later op wins.
IN_FORCE = """
    chain AS (SELECT unnest(?::VARCHAR[]) AS id, unnest(range(len(?::VARCHAR[]))) AS depth),
    ranked AS (SELECT o.fact_id, o.op, o.commit_id,
                      row_number() OVER (PARTITION BY o.fact_id ORDER BY c.depth, o.pos DESC) AS rn
               FROM commit_ops o JOIN chain c ON o.commit_id = c.id),
    in_force AS MATERIALIZED (SELECT fact_id AS id, commit_id FROM ranked WHERE rn = 1 AND op = ?)"""

# Given `ids(id)`: `candidates(id)`, the facts that can be in a contradiction (kledger.conflicts):
# hard (same matching subject and relation, another object) or inverse (a fact's implied value, in
# the slot of a declared single-valued inverse, differs from a value stated there; both ends).
CANDIDATES = """
    s AS MATERIALIZED (SELECT f.id, f.subject_key, f.relation_key, f.object_key FROM facts f
                       SEMI JOIN ids i ON f.id = i.id),
    g AS (SELECT subject_key, relation_key FROM s GROUP BY ALL HAVING count(DISTINCT object_key) > 1),
    hard AS (SELECT s.id FROM s JOIN g USING (subject_key, relation_key)),
    inv AS (SELECT relation_key AS r, inverse_of AS r2 FROM relations WHERE inverse_of IS NOT NULL
            UNION SELECT inverse_of, relation_key FROM relations WHERE inverse_of IS NOT NULL),
    imp AS (SELECT s.id, s.object_key AS sk, inv.r2 AS rk, s.subject_key AS ok FROM s
            JOIN inv ON s.relation_key = inv.r
            WHERE inv.r2 NOT IN (SELECT relation_key FROM relations WHERE multi)),
    pairs AS (SELECT imp.id AS a, t.id AS b FROM imp JOIN s t ON t.subject_key = imp.sk AND t.relation_key = imp.rk
              WHERE t.object_key <> imp.ok AND t.id <> imp.id),
    candidates AS (SELECT id FROM hard UNION SELECT a FROM pairs UNION SELECT b FROM pairs)"""
