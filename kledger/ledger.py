"""The Ledger facade: the library API behind every command.

It resolves revisions, computes the facts in force at a commit (the first parent's facts with the
commit's ops applied), and performs every change to the ledger inside one store transaction. It
never prints; errors are typed (kledger.errors). torch is imported only by the edit engine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

from . import __version__
from .conflicts import SOFT_THRESHOLD, Conflict, find_conflicts, settle, soft_edges
from .errors import (ConflictError, InputError, KledgerError, RevisionError, StateError,
                     UsageError)
from .records import (OP_ADD, OP_RETRACT, Commit, Fact, Op, commit_id, constraints_hash, fact_id,
                      looks_like_id, normalize, relation_key, short)
from .settings import DEFAULT_BRANCH, DEFAULT_MODEL, Settings
from .store import LEDGER_DIR, Store, find_ledger_dir

_BRANCH_RE = re.compile(r"^(?!-)(?!.*\.\.)[A-Za-z0-9._/-]+(?<![./])$")
_REV_SUFFIX = re.compile(r"^(.*?)((?:[~^]\d*)+)$")


def check_branch_name(name: str) -> str:
    if not _BRANCH_RE.match(name) or name in ("HEAD",) or looks_like_id(name) and len(name) >= 40:
        raise UsageError(f"{name!r} is not a valid branch name",
                         "use letters, digits, '.', '_', '-' and '/', not starting with '-'")
    return name


@dataclass
class FactChange:
    """A fact in a diff. For `changed`, `before` is the fact it replaced (same subject and relation)."""

    fact_id: str
    fact: Fact
    before: Fact | None = None
    before_id: str | None = None


@dataclass
class ProposedFacts:
    """Where conflicts are looked for: the facts in force at `commit` with `ops` applied.

    `kind` is "rev" (a revision), "head" (HEAD, nothing staged), "staged" (HEAD and the staged
    ops), "merge" or "cherry-pick" (a stopped operation). `incoming` maps each fact the ops add to
    the commit it comes from (None when staged); `involving` limits the conflicts to those touching
    the incoming facts (a stopped operation), or is None (all of them). `base` (fact → commit that
    put it in force) is None when not loaded (`proposed(lazy=True)`): finding the conflicts then
    takes one query, which fills it with the candidate facts only."""

    kind: str
    commit: str | None
    base: dict[str, str] | None
    ops: list[Op]
    parents: list[str]
    incoming: dict[str, str | None]
    involving: set[str] | None = None
    pending: dict | None = None
    n_facts: int = 0  # facts looked at, set when the conflicts are found


class Ledger:
    """A ledger on disk. Open with `Ledger.open()` (read) or `Ledger.open(write=True)`."""

    def __init__(self, store: Store, env: Settings | None = None):
        self.store = store
        self.env = env or Settings.from_env()
        self._graph: dict[str, tuple[str, ...]] | None = None
        self._state_cache: dict[str, dict[str, str]] = {}
        self._extra_keys: dict = {}  # fact id → first-layer key measured by a commit in progress

    # ================================================================ opening
    @classmethod
    def init(cls, path: str | os.PathLike = ".", model: str | None = None, settings: dict | None = None,
             env: Settings | None = None) -> "Ledger":
        """Make a ledger. `settings` may hold "hparams" (overrides of the model's defaults) and
        "corpus" (a text file for C0)."""
        root = Path(path).expanduser().resolve()
        ldir = root / LEDGER_DIR
        if (ldir / "ledger.duckdb").exists():
            raise StateError(f"a ledger already exists in {ldir}", "use it, or remove that directory first")
        if root.exists() and not root.is_dir():
            raise UsageError(f"{root} is not a directory", "give a directory to create the ledger in")
        env = env or Settings.from_env()
        meta = {"HEAD": f"ref: {DEFAULT_BRANCH}", "model": model or env.model or DEFAULT_MODEL,
                "created": env.now(), "created_by": f"kledger {__version__}"}
        if meta["model"] not in ("", "none"):
            meta["soft_threshold"] = str(SOFT_THRESHOLD)
        settings = settings or {}
        if settings.get("hparams"):
            meta["hparams"] = json.dumps(settings["hparams"], sort_keys=True)
        if settings.get("corpus"):
            meta["corpus"] = str(settings["corpus"])
        return cls(Store.create(ldir, meta, wait=env.lock_wait), env)

    @classmethod
    def open(cls, ledger: str | os.PathLike | None = None, write: bool = False,
             env: Settings | None = None) -> "Ledger":
        env = env or Settings.from_env()
        ldir = find_ledger_dir(explicit=ledger if ledger is not None else env.ledger_dir)
        return cls(Store.open(ldir, write=write, wait=env.lock_wait), env)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self.store.path

    @property
    def model(self) -> str:
        return self.store.meta("model") or DEFAULT_MODEL

    def _changed(self) -> None:
        self._graph = None
        self._state_cache.clear()

    # ================================================================ revisions
    def graph(self) -> dict[str, tuple[str, ...]]:
        if self._graph is None:
            self._graph = self.store.graph()
        return self._graph

    def current_branch(self) -> str | None:
        head = self.store.head()
        return head[5:] if head.startswith("ref: ") else None

    def head(self) -> str | None:
        """The commit HEAD points at, or None on an unborn branch."""
        head = self.store.head()
        return self.store.ref(head[5:]) if head.startswith("ref: ") else head

    def resolve(self, rev: str | None = "HEAD") -> str:
        """A full commit id for HEAD, a branch, a (short) id, with ~N / ^ / ^N suffixes."""
        rev = (rev or "HEAD").strip()
        if not rev:
            raise RevisionError("empty revision", "give HEAD, a branch name or a commit id")
        m = _REV_SUFFIX.match(rev)
        base, suffix = (m.group(1), m.group(2)) if m else (rev, "")
        cid = self._resolve_base(base or "HEAD", rev)
        for part in re.findall(r"[~^]\d*", suffix):
            n = int(part[1:]) if len(part) > 1 else 1
            parents = self.graph().get(cid, ())
            if part[0] == "~":
                for _ in range(n):
                    if not parents:
                        raise RevisionError(f"revision {rev!r} goes past the first commit",
                                            "use a smaller ~N (see `kledger log`)")
                    cid = parents[0]
                    parents = self.graph().get(cid, ())
            else:
                if n == 0:
                    continue
                if len(parents) < n:
                    raise RevisionError(f"commit {short(cid)} has no parent number {n} ({rev!r})",
                                        "^2 exists only on merge commits")
                cid = parents[n - 1]
        return cid

    def _resolve_base(self, base: str, rev: str) -> str:
        if base == "HEAD":
            cid = self.head()
            if cid is None:
                raise RevisionError("HEAD has no commits yet", "add facts and `kledger commit` first")
            return cid
        cid = self.store.ref(base)
        if cid is not None:
            return cid
        if looks_like_id(base.lower()):
            found = self.store.ids_with_prefix(base.lower())
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise RevisionError(f"short id {base!r} is ambiguous ({', '.join(short(f) for f in found)}…)",
                                    "give more characters of the id")
        raise RevisionError(f"unknown revision {rev!r}", "give HEAD, a branch name or a commit id (see `kledger log`)")

    def first_parent_chain(self, cid: str) -> list[str]:
        chain = []
        g = self.graph()
        while cid is not None:
            chain.append(cid)
            parents = g.get(cid, ())
            cid = parents[0] if parents else None
        return chain

    def ancestors(self, cid: str) -> set[str]:
        """cid and every commit reachable from it."""
        g, seen, todo = self.graph(), set(), [cid]
        while todo:
            c = todo.pop()
            if c in seen:
                continue
            seen.add(c)
            todo.extend(g.get(c, ()))
        return seen

    def merge_base(self, a: str, b: str) -> str | None:
        common = self.ancestors(a) & self.ancestors(b)
        if not common:
            return None
        # the best common ancestors are those not reachable from another common ancestor
        order = self.store.commit_order()
        return max(common, key=lambda c: order[c])

    # ================================================================ state
    def state(self, cid: str | None) -> dict[str, str]:
        """Facts in force at commit `cid`: fact id → id of the commit that put it in force."""
        if cid is None:
            return {}
        if cid not in self._state_cache:
            self._state_cache[cid] = self.store.in_force(self.first_parent_chain(cid))
        return self._state_cache[cid]

    def _apply_ops(self, base: dict[str, str], ops: Iterable[Op]) -> set[str]:
        ids = set(base)
        for o in ops:
            if o.op == OP_ADD:
                ids.add(o.fact_id)
            else:
                ids.discard(o.fact_id)
        return ids

    def conflicts_in(self, ids: Iterable[str], involving: Iterable[str] | None = None) -> list[Conflict]:
        """Conflicts among the facts `ids` (only those involving `involving`, if given). One
        aggregate query finds the few facts that can take part in a hard or inverse conflict; on a
        model ledger, the stored first-layer keys of all of them are compared for soft ones."""
        ids = set(ids)
        return self._conflicts_among(self.store.conflict_candidates(ids), involving, soft_among=ids)

    def _conflicts_among(self, candidates: Iterable[str], involving: Iterable[str] | None = None,
                         soft_among: Iterable[str] = ()) -> list[Conflict]:
        multi, inverse = self.relation_rules()
        soft = self._soft_edges(soft_among, multi)
        ids = set(candidates) | {f for e in soft for f in e[:2]}
        return find_conflicts(self.store.facts(ids), multi, involving, inverse=inverse, extra_edges=soft)

    # ---------------------------------------------------------------- soft conflicts
    def soft_threshold(self) -> float | None:
        """The cosine above which first-layer keys count as one subject (None: soft conflicts off;
        always None on a ledger without a model, which has no keys)."""
        if not self.has_model:
            return None
        value = self.store.meta("soft_threshold")
        if value is None:
            return SOFT_THRESHOLD
        return None if value == "off" else float(value)

    def set_soft_threshold(self, value: str) -> dict:
        """Set the soft-conflict threshold: a cosine in (0, 1], "off", or "default"."""
        v = value.strip().lower()
        if v not in ("off", "default"):
            try:
                x = float(v)
            except ValueError:
                x = float("nan")
            if not 0 < x <= 1:
                raise UsageError(f"soft-conflict threshold must be a cosine in (0, 1], 'off' or 'default', got {value!r}",
                                 f"e.g. `kledger config soft-threshold {SOFT_THRESHOLD}`")
            v = repr(x)
        with self.store.transaction():
            self.store.set_meta("soft_threshold", str(SOFT_THRESHOLD) if v == "default" else v)
        return self.config()

    def config(self) -> dict:
        """The ledger's settings (read-only ones included)."""
        thr = self.soft_threshold()
        return {"model": self.model, "soft_threshold": "off" if thr is None and self.has_model else thr,
                "hparams": json.loads(self.store.meta("hparams") or "{}"), "corpus": self.store.meta("corpus")}

    @contextmanager
    def _new_keys(self, rows: list) -> Iterator[None]:
        """Within the block, soft conflicts also see the first-layer keys of these freshly measured
        constraint rows (facts not stored yet)."""
        if not rows:
            yield
            return
        low = min(r.layer for r in rows)
        self._extra_keys = {r.fact_id: r.key for r in rows if r.layer == low}
        try:
            yield
        finally:
            self._extra_keys = {}

    def _soft_edges(self, ids: Iterable[str], multi: set[str]) -> list[tuple[str, str, str]]:
        thr = self.soft_threshold()
        ids = set(ids)
        if thr is None or len(ids) < 2:
            return []
        keys = self.store.first_layer_keys(sorted(ids))
        keys.update({f: k for f, k in self._extra_keys.items() if f in ids})
        if len(keys) < 2:
            return []
        return soft_edges(self.store.facts(keys), keys, thr, multi)

    # ================================================================ staging
    def add(self, facts: list[Fact]) -> dict:
        """Stage facts to add. Facts already in force at HEAD or already staged are skipped."""
        if not facts:
            raise InputError("no facts to add", "give PROMPT TARGET --subject S, or --file F")
        with self.store.transaction():
            in_force = self.state(self.head())
            staged = {o.fact_id for o in self.store.staged()}
            new, seen = [], set()
            for f in facts:
                fid = f.id
                if fid in in_force or fid in staged or fid in seen:
                    continue
                seen.add(fid)
                new.append(f)
            self.store.put_facts(new)
            self.store.stage([Op(OP_ADD, f.id) for f in new])
        return {"staged": len(new), "skipped": len(facts) - len(new), "fact_ids": [f.id for f in new]}

    def remove(self, subject: str, relation: str | None = None) -> dict:
        """Stage the retraction of the facts in force at HEAD about `subject` (and `relation`)."""
        in_force = self.state(self.head())
        ids = sorted(set(in_force) & self.store.fact_ids_matching(subject, relation))
        if not ids:
            raise InputError(f"no fact about {subject!r}{' with that relation' if relation else ''} is in force",
                             "check the subject with `kledger blame` or `kledger log --subject`")
        with self.store.transaction():
            staged = {o.fact_id for o in self.store.staged()}
            ops = [Op(OP_RETRACT, i) for i in ids if i not in staged]
            self.store.stage(ops)
        return {"staged": len(ops), "fact_ids": ids}

    def reset(self, subject: str | None = None) -> int:
        """Unstage everything, or the staged facts about `subject`."""
        with self.store.transaction():
            staged = self.store.staged()
            if subject is None:
                ids = [o.fact_id for o in staged]
            else:
                match = self.store.fact_ids_matching(subject, None)
                ids = [o.fact_id for o in staged if o.fact_id in match]
            self.store.clear_staged(ids if subject is not None else None)
        return len(ids)

    def status(self) -> dict:
        head = self.head()
        staged = self.store.staged()
        facts = self.store.facts(o.fact_id for o in staged)
        pending = self.store.pending()
        return {
            "branch": self.current_branch(),
            "head": head,
            "facts_in_force": (len(self._state_cache[head]) if head in self._state_cache
                               else self.store.count_in_force(self.first_parent_chain(head)) if head else 0),
            "staged": [{"op": o.op, "fact_id": o.fact_id, **facts[o.fact_id].to_dict()} for o in staged],
            "pending": pending,
            "model": self.model,
        }

    # ================================================================ committing
    def _new_commit(self, parents: list[str], ops: list[Op], message: str, author: str | None,
                    meta: dict | None = None, allow_conflicts: bool = False,
                    introduced: Iterable[str] | None = None, constraints: str | None = None) -> str:
        """Write a commit on HEAD's branch (or detached HEAD) in the current transaction."""
        if not message or not message.strip():
            raise UsageError("empty commit message", "give -m MESSAGE")
        base = self.state(parents[0]) if parents else {}
        after = self._apply_ops(base, ops)
        added = [o.fact_id for o in ops if o.op == OP_ADD] if introduced is None else list(introduced)
        found = self.conflicts_in(after, involving=added)
        if found:  # replay remembered decisions (rerere) before refusing
            ops, found, replayed = self._replay_decisions(base, ops, added)
            if replayed:
                meta = {**(meta or {}), "resolved": [*(meta or {}).get("resolved", []), *replayed]}
        if found and not allow_conflicts:
            raise ConflictError(
                f"{len(found)} unresolved conflict(s): {describe(found[0], self.store.facts(found[0].fact_ids))}",
                "run `kledger conflicts` and `kledger resolve`, or pass --allow-conflicts to record them as open",
                conflicts=found)
        if found:
            meta = {**(meta or {}), "open_conflicts": [c.key for c in found]}
        commit = Commit(parents=tuple(parents), ops=tuple(ops), message=message.strip(),
                        author=(author or self.env.default_author()).strip(), timestamp=self.env.now(), meta=meta or {},
                        constraints=constraints)
        cid = self.store.put_commit(commit)
        self._move_head(cid)
        return cid

    def _move_head(self, cid: str) -> None:
        branch = self.current_branch()
        if branch is not None:
            self.store.set_ref(branch, cid)
        else:
            self.store.set_head(cid)
        self._changed()

    def commit(self, message: str, author: str | None = None, allow_conflicts: bool = False,
               compute: bool | None = None, progress=None, meta: dict | None = None,
               measure_without: Iterable[str] = ()) -> str:
        """Commit the staged changes. On a ledger with a model (the default), the constraints of
        the added facts are first measured against apply(HEAD) (sequential editing) and stored
        with the commit, in the same transaction; `compute=False` records facts only. With
        `measure_without`, they are measured against apply(HEAD) without those facts' constraints
        (`resolve` re-measuring kept facts as if the losers had never been made)."""
        if self.store.pending():
            raise StateError(f"a {self.store.pending()['kind']} is in progress",
                             "finish it with `kledger resolve`, or abandon it with --abort")
        ops = self.store.staged()
        if not ops:
            raise StateError("nothing staged to commit", "stage facts with `kledger add` first")
        if not message or not message.strip():
            raise UsageError("empty commit message", "give -m MESSAGE")
        head = self.head()
        staged, digest, rows = ops, None, []
        if compute if compute is not None else self.has_model:
            # Remembered decisions first, so that a staged fact that loses to one is not measured;
            # then measure; then the decisions about soft conflicts, which the new keys reveal.
            base = self.state(head) if head else {}
            adds = [o.fact_id for o in ops if o.op == OP_ADD]
            ops, _, replayed = self._replay_decisions(base, ops, adds)
            added = self.store.facts(o.fact_id for o in ops if o.op == OP_ADD)
            digest, rows = self._measure(head, [added[o.fact_id] for o in ops if o.op == OP_ADD], progress,
                                         exclude=measure_without)
            with self._new_keys(rows):
                ops, _, replayed_soft = self._replay_decisions(base, ops, adds)
            kept = {o.fact_id for o in ops if o.op == OP_ADD}
            if len(kept) < len(added):
                rows = [r for r in rows if r.fact_id in kept]
                digest = constraints_hash(rows)
            if replayed or replayed_soft:
                meta = {**(meta or {}), "resolved": [*(meta or {}).get("resolved", []), *replayed, *replayed_soft]}
        with self.store.transaction(), self._new_keys(rows):
            if self.store.staged() != staged or self.head() != head:
                raise StateError("the staged facts or HEAD changed while the commit was computed", "run it again")
            cid = self._new_commit([head] if head else [], ops, message, author, allow_conflicts=allow_conflicts,
                                   constraints=digest, meta=meta)
            self._store_constraints(cid, rows)
            self.store.clear_staged()
            self.env.fault_point("commit")
        return cid

    def replay(self, base: str | None = None, author: str | None = None, progress=None) -> dict:
        """Rewrite the commits after `base` on HEAD's first-parent chain (all of them without
        `base`) as new commits whose added facts are measured afresh against apply(new parent),
        as `git rebase` rewrites commits; then move HEAD's branch to the new tip. A merge becomes
        an ordinary commit with the same changes (its second parent is not kept). The old commits
        stay, reachable by id."""
        head = self._require_head("replay")
        if not self.has_model:
            raise StateError("this ledger has no model, so there is nothing to measure",
                             "replay is for ledgers made with a model")
        chain = list(reversed(self.first_parent_chain(head)))
        start, parent = 0, None
        if base is not None:
            parent = self.resolve(base)
            if parent not in chain:
                raise UsageError(f"{short(parent)} is not on HEAD's first-parent history",
                                 "give a commit that `kledger log --oneline` lists")
            start = chain.index(parent) + 1
        todo = chain[start:]
        if not todo:
            raise StateError("nothing to replay after that commit", "give an older base")
        commits = self.store.commits(todo)
        mapping = {}
        with self.store.transaction():
            for i, cid in enumerate(todo):
                c = commits[cid]
                if progress is not None:
                    progress("replay", i, len(todo))
                added = self.store.facts(o.fact_id for o in c.ops if o.op == OP_ADD)
                self._changed()
                digest, rows = self._measure(parent, [added[o.fact_id] for o in c.ops if o.op == OP_ADD], progress)
                meta = {k: v for k, v in c.meta.items() if k not in ("merged", "merge_base")}
                new = Commit(parents=(parent,) if parent else (), ops=c.ops, message=c.message,
                             author=author or c.author, timestamp=self.env.now(), constraints=digest,
                             meta={**meta, "replayed_from": cid})
                parent = self.store.put_commit(new)
                self._store_constraints(parent, rows)
                mapping[cid] = parent
            self._move_head(parent)
        if progress is not None:
            progress("replay", len(todo), len(todo))
        return {"replayed": len(todo), "head": parent, "mapping": mapping}

    def _measure(self, parent: str | None, facts: list[Fact], progress=None,
                 skip_known: bool = False, exclude: Iterable[str] = ()) -> tuple[str | None, list]:
        """(constraints hash, rows) of `facts` measured against apply(parent): see
        kledger.model_side.measure."""
        from . import model_side

        return model_side.measure(self, parent, facts, exclude, progress, skip_known=skip_known)

    def _store_constraints(self, cid: str, rows: list) -> None:
        if not rows:
            return
        fp_id, body = self.editor().fingerprint()
        self.store.put_fingerprint(fp_id, body)
        self.store.put_constraints(cid, rows)

    @property
    def has_model(self) -> bool:
        return self.model not in ("", "none")

    def editor(self, progress=None, **kwargs):
        """The ledger's model side (kledger.edit.editor.Editor: the model, hyper-parameters and
        corpus the ledger was made with; torch is imported when it is used). One per Ledger
        unless options (`model`, `corpus`, `overrides`) are given."""
        from .edit.editor import Editor

        if kwargs or getattr(self, "_editor", None) is None:
            if not self.has_model and "model" not in kwargs:
                raise StateError("this ledger has no model (it was made with --model none)",
                                 "make a ledger with `kledger init --model NAME` to edit a model")
            opts = {"model": self.model, "overrides": json.loads(self.store.meta("hparams") or "{}"),
                    "corpus": self.store.meta("corpus"), **kwargs}
            self._editor = Editor(opts.pop("model"), store=self.store, cache_dir=self.path / "cache" / "apply",
                                  env=self.env, progress=progress, **opts)
        elif progress is not None:
            self._editor.progress = progress
        return self._editor

    # ================================================================ the model (kledger.model_side)
    def apply(self, rev: str | None = "HEAD", mode: str = "accumulated", out_dir: Path | None = None,
              delta: Path | None = None, progress=None) -> dict:
        """Solve the constraints in force at `rev` and write the edited model (the `kledger apply`
        document); see kledger.model_side.apply."""
        from . import model_side

        return model_side.apply(self, rev, mode, out_dir, delta, progress)

    def ask(self, prompt: str, rev: str | None = "HEAD", mode: str = "accumulated", top: int = 5,
            max_new_tokens: int = 8, progress=None) -> dict:
        """The model's answer at `rev` beside the base model's (the `kledger ask` document)."""
        from . import model_side

        return model_side.ask(self, prompt, rev, mode, top, max_new_tokens, progress)

    def evaluate(self, rev: str | None = "HEAD", opts=None, progress=None) -> dict:
        """Metrics at `rev` beside the base model (the `kledger eval` document); `opts` a
        kledger.model_side.EvalOptions."""
        from . import model_side

        return model_side.evaluate(self, rev, opts, progress)

    # ================================================================ history
    def log(self, rev: str | None = "HEAD", limit: int | None = None, subject: str | None = None,
            relation: str | None = None, all_refs: bool = False) -> list[dict]:
        """Commits reachable from `rev` (or from every branch), newest first."""
        if all_refs:
            tips = set(self.store.refs().values()) | ({self.head()} - {None})
        else:
            tips = {self.resolve(rev)}
        reach: set[str] = set()
        for t in tips:
            reach |= self.ancestors(t)
        order = self.store.commit_order()
        ids = sorted(reach, key=lambda c: order[c], reverse=True)
        if subject is not None or relation is not None:
            touching = self.store.commits_touching(self.store.fact_ids_matching(subject, relation), ids)
            ids = [c for c in ids if c in touching]
        if limit is not None:
            ids = ids[:limit]
        commits = self.store.commits(ids, with_ops=False)
        counts = self.store.op_counts(ids)
        refs_at: dict[str, list[str]] = {}
        for name, c in self.store.refs().items():
            refs_at.setdefault(c, []).append(name)
        return [self._commit_summary(c, commits[c], counts.get(c, (0, 0)), refs_at.get(c, [])) for c in ids]

    def _commit_summary(self, cid: str, c: Commit, counts: tuple[int, int], refs: list[str]) -> dict:
        return {"id": cid, "parents": list(c.parents), "author": c.author, "timestamp": c.timestamp,
                "message": c.message, "added": counts[0], "retracted": counts[1], "refs": refs,
                "meta": c.meta, "constraints": c.constraints}

    def show(self, rev: str = "HEAD") -> dict:
        cid = self.resolve(rev)
        c = self.store.commit(cid)
        facts = self.store.facts(o.fact_id for o in c.ops)
        counts = (sum(o.op == OP_ADD for o in c.ops), sum(o.op != OP_ADD for o in c.ops))
        refs = [n for n, v in self.store.refs().items() if v == cid]
        out = self._commit_summary(cid, c, counts, refs)
        out["ops"] = [{"op": o.op, "fact_id": o.fact_id, **facts[o.fact_id].to_dict()} for o in c.ops]
        return out

    def diff(self, rev_a: str | None = None, rev_b: str | None = None, with_facts: bool = True) -> dict:
        """Facts added, removed and changed (same subject and relation, another fact) from a to b.
        With no revisions: HEAD against HEAD plus the staged changes; with one: that revision
        against HEAD. `with_facts=False` gives only the counts (no fact is loaded)."""
        if rev_a is None and rev_b is None:
            head = self.head()
            before = set(self.state(head))
            after = self._apply_ops(self.state(head), self.store.staged())
            facts = self.store.facts((after - before) | (before - after))
            added, removed, changed = _pair_changes(sorted(after - before), sorted(before - after), facts)
            label = ("HEAD", "staged")
        else:
            a, b = self.resolve(rev_a), self.resolve(rev_b or "HEAD")
            added, removed, changed = self.store.diff(self.first_parent_chain(a), self.first_parent_chain(b))
            label = (a, b)
            facts = None
        counts = {"added": len(added), "removed": len(removed), "changed": len(changed)}
        if not with_facts:
            return {"from": label[0], "to": label[1], "counts": counts}
        if facts is None:
            facts = self.store.facts([*added, *removed, *(i for pair in changed for i in pair)])
        return {"from": label[0], "to": label[1], "counts": counts,
                "added": [FactChange(i, facts[i]) for i in added],
                "removed": [FactChange(i, facts[i]) for i in removed],
                "changed": [FactChange(new, facts[new], facts[old], old) for old, new in changed]}

    def blame(self, subject: str, relation: str | None = None, rev: str = "HEAD") -> list[dict]:
        cid = self.resolve(rev)
        in_force = self.state(cid)
        ids = sorted(set(in_force) & self.store.fact_ids_matching(subject, relation))
        facts = self.store.facts(ids)
        commits = self.store.commits({in_force[i] for i in ids}, with_ops=False)
        out = []
        for i in sorted(ids, key=lambda i: (facts[i].relation, facts[i].target)):
            c = commits[in_force[i]]
            out.append({"fact_id": i, **facts[i].to_dict(), "commit": in_force[i], "author": c.author,
                        "timestamp": c.timestamp, "message": c.message})
        return out

    # ================================================================ branches
    def branches(self) -> list[dict]:
        cur = self.current_branch()
        return [{"name": n, "commit": c, "current": n == cur} for n, c in self.store.refs().items()]

    def create_branch(self, name: str, rev: str = "HEAD", force: bool = False) -> str:
        check_branch_name(name)
        cid = self.resolve(rev)
        with self.store.transaction():
            if self.store.ref(name) is not None and not force:
                raise StateError(f"branch {name!r} already exists", "choose another name, or use --force to move it")
            if force and name == self.current_branch():
                raise StateError(f"cannot force-move the current branch {name!r}", "check out another branch first")
            self.store.set_ref(name, cid)
        return cid

    def delete_branch(self, name: str) -> str:
        with self.store.transaction():
            cid = self.store.ref(name)
            if cid is None:
                raise UsageError(f"no branch named {name!r}", "see `kledger branch` for the list")
            if name == self.current_branch():
                raise StateError(f"cannot delete the current branch {name!r}", "check out another branch first")
            self.store.delete_ref(name)
        return cid

    def checkout(self, target: str, create: bool = False, start: str | None = None) -> dict:
        if self.store.pending():
            raise StateError(f"a {self.store.pending()['kind']} is in progress",
                             "finish it with `kledger resolve`, or abandon it with --abort")
        with self.store.transaction():
            if create:
                cid = self.resolve(start) if start is not None else self.head()
                check_branch_name(target)
                if self.store.ref(target) is not None:
                    raise StateError(f"branch {target!r} already exists", "check it out without -b")
                if cid is None:
                    self.store.set_head(f"ref: {target}")
                else:
                    self.store.set_ref(target, cid)
                    self.store.set_head(f"ref: {target}")
                self._changed()
                return {"branch": target, "head": cid}
            if self.store.ref(target) is not None:
                self.store.set_head(f"ref: {target}")
                self._changed()
                return {"branch": target, "head": self.store.ref(target)}
            cid = self.resolve(target)
            self.store.set_head(cid)
            self._changed()
            return {"branch": None, "head": cid}

    # ================================================================ rearranging
    def _delta(self, cid: str) -> tuple[set[str], set[str]]:
        """(facts the commit put in force, facts it took out), relative to its first parent."""
        c_parents = self.graph()[cid]
        before = set(self.state(c_parents[0])) if c_parents else set()
        after = set(self.state(cid))
        return after - before, before - after

    def _require_head(self, what: str) -> str:
        if self.store.pending():
            raise StateError(f"a {self.store.pending()['kind']} is in progress",
                             "finish it with `kledger resolve`, or abandon it with --abort")
        head = self.head()
        if head is None:
            raise StateError(f"cannot {what}: HEAD has no commits yet", "commit something first")
        return head

    def revert(self, rev: str, author: str | None = None, message: str | None = None,
               allow_conflicts: bool = False) -> str:
        cid = self.resolve(rev)
        head = self._require_head("revert")
        added, removed = self._delta(cid)
        now = self.state(head)
        ops = [Op(OP_RETRACT, i) for i in sorted(added) if i in now]
        ops += [Op(OP_ADD, i) for i in sorted(removed) if i not in now]
        if not ops:
            raise StateError(f"reverting {short(cid)} changes nothing at HEAD", "its facts are already gone")
        c = self.store.commit(cid)
        body = {"theirs": cid, "head": head, "ops": [o.to_list() for o in ops],
                "message": message or f'Revert "{c.message}"', "author": author, "meta": {"reverts": cid}}
        return self._finish_or_stop("revert", [head], body, allow_conflicts)

    def cherry_pick(self, rev: str, author: str | None = None, allow_conflicts: bool = False) -> str:
        cid = self.resolve(rev)
        head = self._require_head("cherry-pick")
        added, removed = self._delta(cid)
        now = self.state(head)
        ops = [Op(OP_ADD, i) for i in sorted(added) if i not in now]
        ops += [Op(OP_RETRACT, i) for i in sorted(removed) if i in now]
        if not ops:
            raise StateError(f"cherry-picking {short(cid)} changes nothing at HEAD", "its facts are already in force")
        c = self.store.commit(cid)
        body = {"theirs": cid, "head": head, "ops": [o.to_list() for o in ops], "message": c.message,
                "author": author or c.author, "meta": {"cherry_picked_from": cid}}
        return self._finish_or_stop("cherry-pick", [head], body, allow_conflicts)

    def merge(self, branch: str, author: str | None = None, message: str | None = None,
              no_ff: bool = False, allow_conflicts: bool = False) -> dict:
        theirs = self.resolve(branch)
        head = self._require_head("merge")
        if theirs in self.ancestors(head):
            return {"result": "up-to-date", "head": head, **self._change_counts(head, head)}
        base = self.merge_base(head, theirs)
        if base == head and not no_ff:
            with self.store.transaction():
                self._move_head(theirs)
            return {"result": "fast-forward", "head": theirs, **self._change_counts(head, theirs)}
        base_ids = set(self.state(base)) if base else set()
        their_ids, our_ids = set(self.state(theirs)), set(self.state(head))
        ops = [Op(OP_ADD, i) for i in sorted(their_ids - base_ids) if i not in our_ids]
        ops += [Op(OP_RETRACT, i) for i in sorted(base_ids - their_ids) if i in our_ids]
        body = {"theirs": theirs, "head": head, "ops": [o.to_list() for o in ops],
                "message": message or f"Merge {branch!r} into {self.current_branch() or short(head)}",
                "author": author, "meta": {"merged": theirs, "merge_base": base}}
        cid = self._finish_or_stop("merge", [head, theirs], body, allow_conflicts)
        return {"result": "merge", "head": cid, **self._change_counts(head, cid)}

    def _change_counts(self, a: str, b: str) -> dict:
        """How many facts came into force and went out of force from a to b."""
        sa, sb = set(self.state(a)), set(self.state(b))
        return {"added": len(sb - sa), "retracted": len(sa - sb)}

    def _finish_or_stop(self, kind: str, parents: list[str], body: dict, allow_conflicts: bool) -> str:
        """Commit a merge or cherry-pick, or — when it would bring contradictions — record it as
        pending with its conflicts and raise ConflictError (exit code 3). Nothing else changes."""
        ops = [Op(o, f) for o, f in body["ops"]]
        try:
            with self.store.transaction():
                return self._new_commit(parents, ops, body["message"], body.get("author"), meta=body["meta"],
                                        allow_conflicts=allow_conflicts)
        except ConflictError as exc:
            body = {**body, "parents": parents, "conflicts": [c.key for c in exc.conflicts]}
            with self.store.transaction():
                self.store.set_pending(kind, body)
            raise ConflictError(
                f"{kind} stopped: {exc.message}",
                f"run `kledger conflicts` and `kledger resolve`, or `kledger {kind} --abort`",
                conflicts=exc.conflicts) from None

    def abort(self, kind: str | None = None) -> dict:
        pending = self.store.pending()
        if pending is None or (kind and pending["kind"] != kind):
            raise StateError(f"no {kind or 'merge or cherry-pick'} in progress", "nothing to abort")
        with self.store.transaction():
            self.store.set_pending(None)
        return pending

    # ================================================================ conflicts, decisions, relations
    def relation_rules(self) -> tuple[set[str], dict[str, str]]:
        """(multi-valued relation keys, relation key → its declared inverse, in both directions)."""
        multi, inverse = set(), {}
        for key, rel in self.store.relations().items():
            if rel["multi"]:
                multi.add(key)
            if rel["inverse_of"]:
                inverse[key] = rel["inverse_of"]
                inverse[rel["inverse_of"]] = key
        return multi, inverse

    def relations(self) -> list[dict]:
        return [{"relation": k, "multi": bool(v["multi"]), "inverse_of": v["inverse_of"]}
                for k, v in sorted(self.store.relations().items())]

    def set_multi(self, relation: str, multi: bool) -> dict:
        """Declare a relation multi-valued (several objects per subject are no contradiction) or
        single-valued again (the default)."""
        key = _relation_arg(relation)
        with self.store.transaction():
            self.store.set_relation(key, multi=multi)
        return next(r for r in self.relations() if r["relation"] == key)

    def set_inverse(self, relation: str, other: str | None) -> dict:
        """Declare `relation` and `other` inverse of each other (a relation may be its own inverse);
        with `other` None, remove `relation`'s inverse declaration. A relation has one inverse: an
        older declaration of either is replaced."""
        key = _relation_arg(relation)
        with self.store.transaction():
            rels = self.store.relations()
            if other is None:
                old = rels.get(key, {}).get("inverse_of")
                if not old:
                    raise InputError(f"relation {key!r} has no inverse declared", "see `kledger relation list`")
                self.store.unset_inverse(key)
                self.store.unset_inverse(old)
            else:
                key2 = _relation_arg(other)
                for k in (key, key2):
                    old = rels.get(k, {}).get("inverse_of")
                    if old and old not in (key, key2):
                        self.store.unset_inverse(old)
                self.store.set_relation(key, inverse_of=key2)
                self.store.set_relation(key2, inverse_of=key)
        return next(r for r in self.relations() if r["relation"] == key)

    def proposed(self, rev: str | None = None, staged: bool = False, pending: bool = False,
                 lazy: bool = False) -> ProposedFacts:
        """The facts to look for conflicts in: REV's; else, with `pending`, the stopped merge or
        cherry-pick if there is one; else HEAD's, with the staged ops when `staged`. With `lazy`, the
        facts in force at a revision or HEAD are not loaded: `_conflicts_of` needs one query."""
        if rev is not None and staged:
            raise UsageError("give a revision or --staged, not both", "--staged means HEAD with the staged facts")
        if rev is not None:
            cid = self.resolve(rev)
            return ProposedFacts("rev", cid, None if lazy else self.state(cid), [], [cid], {})
        p = self.store.pending() if pending else None
        if p is not None:
            ops = [Op(o, f) for o, f in p["ops"]]
            theirs = self.state(p["theirs"])
            adds = {o.fact_id for o in ops if o.op == OP_ADD}
            return ProposedFacts(p["kind"], p["head"], self.state(p["head"]), ops, list(p["parents"]),
                                 {f: theirs.get(f, p["theirs"]) for f in adds}, adds, p)
        head = self.head()
        ops = self.store.staged() if staged else []
        return ProposedFacts("staged" if ops else "head", head, None if lazy else self.state(head), ops,
                             [head] if head else [], {o.fact_id: None for o in ops if o.op == OP_ADD})

    def _conflicts_of(self, pf: ProposedFacts) -> list[Conflict]:
        """The conflicts in `pf`; sets `pf.n_facts`."""
        if pf.base is None:  # not loaded: the facts in force, the ops and the candidates in one query
            last = {o.fact_id: o.op for o in pf.ops}  # a fact's last op decides (as in _apply_ops)
            pf.n_facts, pf.base = self.store.conflict_candidates_at(
                self.first_parent_chain(pf.commit) if pf.commit else [],
                added=[f for f, op in last.items() if op == OP_ADD],
                retracted=[f for f, op in last.items() if op != OP_ADD])
            soft_among: Iterable[str] = ()
            if self.soft_threshold() is not None:  # soft conflicts compare every fact in force
                soft_among = self._apply_ops(self.state(pf.commit) if pf.commit else {}, pf.ops)
            return self._conflicts_among(pf.base, pf.involving, soft_among)
        after = self._apply_ops(pf.base, pf.ops)
        pf.n_facts = len(after)
        return self.conflicts_in(after, involving=pf.involving)

    def _drop(self, base: dict[str, str], ops: list[Op], dropped: Iterable[str]) -> list[Op]:
        """`ops` changed so that the `dropped` facts are not in force afterwards: their add ops are
        left out, and those in force before are retracted."""
        dropped = set(dropped)
        ops = [o for o in ops if not (o.op == OP_ADD and o.fact_id in dropped)]
        still = self._apply_ops(base, ops) & dropped
        return ops + [Op(OP_RETRACT, f) for f in sorted(still)]

    def _replay_decisions(self, base: dict[str, str], ops: list[Op], involving: Iterable[str] | None,
                          fresh: Iterable[str] = ()) -> tuple[list[Op], list[Conflict], list[dict]]:
        """Apply the recorded decisions (the `resolutions` table) to the conflicts that `ops` on
        `base` leave (those touching `involving`, if given), as git rerere does. Returns the new
        ops, the conflicts left, and one entry per decision applied (`remembered` is False for the
        keys in `fresh`, decided by the running command). Reads only."""
        fresh, involving = set(fresh), None if involving is None else set(involving)
        entries: list[dict] = []
        tried: set[str] = set()
        while True:
            after = self._apply_ops(base, ops)
            found = self.conflicts_in(after, involving=None if involving is None else involving & after)
            progress = False
            for c in found:
                if c.key in tried:
                    continue
                tried.add(c.key)
                decision = self.store.resolution(c.key)
                if decision is None:
                    continue
                try:
                    _, dropped = settle(c, keep=decision["keep"])
                except InputError:  # the recorded decision does not fit: leave it to the user
                    continue
                ops = self._drop(base, ops, dropped)
                entries.append({**_conflict_id(c), "keep": decision["keep"], "dropped": sorted(dropped),
                                "decided_by": decision.get("author"), "decided_at": decision.get("at"),
                                "remembered": c.key not in fresh})
                progress = True
            if not progress:
                return ops, found, entries

    def _sources(self, pf: ProposedFacts, ids: Iterable[str]) -> dict[str, dict]:
        """fact id → side ("ours", "theirs", "staged"), the commit that brought it, its author,
        date and message, and `age` (a sort key: staged facts are the newest)."""
        src = {f: (pf.incoming[f] if f in pf.incoming else pf.base.get(f)) for f in ids}
        commits = self.store.commits({c for c in src.values() if c}, with_ops=False)
        order = self.store.commit_order() if commits else {}
        incoming_side = "theirs" if pf.kind in ("merge", "cherry-pick") else "staged"
        out = {}
        for f, cid in src.items():
            c = commits.get(cid) if cid else None
            out[f] = {"side": incoming_side if f in pf.incoming else "ours", "commit": cid,
                      "author": c.author if c else None, "timestamp": c.timestamp if c else None,
                      "message": c.message if c else None,
                      "age": (1, "", 0) if c is None else (0, c.timestamp, order.get(cid, 0))}
        return out

    def _report(self, pf: ProposedFacts, conflicts: list[Conflict]) -> list[dict]:
        ids = [f for c in conflicts for f in c.fact_ids]
        facts, src = self.store.facts(ids), self._sources(pf, ids)
        out = []
        for c in conflicts:
            newest_age = max(src[f]["age"] for f in c.fact_ids)
            newest = [f for f in c.fact_ids if src[f]["age"] == newest_age]
            sides = {src[f]["side"] for f in newest}
            rows = []
            for f in sorted(c.fact_ids, key=lambda f: src[f]["age"]):
                fact, s = facts[f], src[f]
                rows.append({"fact_id": f, "subject": fact.subject, "prompt": fact.prompt, "target": fact.target,
                             "relation": fact.relation, **{k: v for k, v in s.items() if k != "age"},
                             "newest": f in newest,
                             "claims": [{k: v for k, v in cl.to_dict().items() if k != "fact_id"}
                                        for cl in c.claims if cl.fact_id == f]})
            remembered = self.store.resolution(c.key)
            out.append({**_conflict_id(c), "fact_ids": list(c.fact_ids), "edges": [list(e) for e in c.edges],
                        "newest": {"side": sides.pop() if len(sides) == 1 else None, "fact_ids": newest,
                                   "objects": list(c.values_of(newest))},
                        "remembered": remembered, "facts": rows})
        return out

    def conflicts(self, rev: str | None = None, staged: bool = False) -> dict:
        """Every conflict in REV; with no REV, in the stopped merge or cherry-pick if there is one,
        else at HEAD with the staged facts."""
        pf = self.proposed(rev, staged=staged or rev is None, pending=rev is None and not staged, lazy=True)
        found = self._conflicts_of(pf)
        return {"target": _target(pf), "facts": pf.n_facts, "conflicts": self._report(pf, found)}

    def check(self, rev: str | None = None, staged: bool = False) -> dict:
        """The CI gate: unresolved conflicts in the facts in force at REV (default HEAD), or, with
        `staged`, in what `kledger commit` would make of HEAD and the staged facts (remembered
        decisions replayed, as the commit would). `ok` is True when there are none."""
        pf = self.proposed(rev, staged=staged, lazy=True)
        found = self._conflicts_of(pf)
        replayed: list[dict] = []
        incoming = set(pf.incoming)
        if any(incoming.intersection(c.fact_ids) and self.store.resolution(c.key) for c in found):
            pf.base = self.state(pf.commit)  # replay as `commit` would, then look again
            pf.ops, _, replayed = self._replay_decisions(pf.base, pf.ops, incoming)
            found = self._conflicts_of(pf)
        return {"ok": not found, "target": _target(pf), "facts": pf.n_facts,
                "unresolved": len(found), "conflicts": self._report(pf, found), "replayed": replayed}

    def _pick(self, found: list[Conflict], selector: str | None, keep: str | None) -> list[Conflict]:
        hits = found
        if selector is not None and selector.strip():
            sel, norm = selector.strip().lower(), normalize(selector)
            facts = self.store.facts(f for c in found for f in c.fact_ids)
            hits = [c for c in found
                    if (looks_like_id(sel) and c.key.startswith(sel)) or norm == c.subject
                    or norm in {cl.subject for cl in c.claims} or norm in {facts[f].key[0] for f in c.fact_ids}]
            if not hits:
                raise InputError(f"no conflict matches {selector!r}",
                                 "give a key (prefix) or a subject from `kledger conflicts`")
        if keep is None:  # --ours/--theirs/--newest: the undecided ones unless a conflict is named
            if selector is None or not selector.strip():
                undecided = [c for c in hits if self.store.resolution(c.key) is None]
                return undecided or hits
            return hits
        value = normalize(keep)
        with_value = [c for c in hits if value in c.objects]
        if len(with_value) == 1:
            return with_value
        if not with_value:
            choices = "; ".join(f"{c.key[:10]}: {', '.join(c.objects)}" for c in hits[:5])
            raise InputError(f"no conflict has the object {keep!r}", f"keep one of the objects listed ({choices})")
        raise InputError(f"{len(with_value)} conflicts have the object {keep!r}",
                         f"name one: `kledger resolve KEY --keep {keep}` with KEY one of "
                         + ", ".join(c.key[:10] for c in with_value))

    def resolve_conflicts(self, conflict: str | None = None, keep: str | None = None, strategy: str = "keep",
                          message: str | None = None, author: str | None = None) -> dict:
        """Decide conflicts and commit the decision, in one transaction.

        Where: the stopped merge or cherry-pick if there is one, else HEAD with the staged facts.
        Which: `conflict` (a key prefix or a subject), else the one conflict that has the object
        `keep`, else (ours, theirs, newest) all that have no recorded decision yet. How (`strategy`): "keep" the facts that
        claim `keep`; "ours" or "theirs" (a stopped operation only); "newest" (the facts from the
        latest commit, staged facts being newer than any). Each decision is recorded in
        `resolutions` (kept objects, who, when) and replayed whenever the same conflict comes back.
        The losing facts are not in force after the commit: the incoming add ops are left out, the
        others retracted. The commit (the merge or cherry-pick itself, or a commit of the staged
        facts and retractions on HEAD) lists the decisions in `meta.resolved`. When conflicts that
        block it remain, the decisions are recorded and no commit is made yet."""
        if strategy not in ("keep", "ours", "theirs", "newest"):
            raise UsageError(f"unknown strategy {strategy!r}", "use --keep, --ours, --theirs or --newest")
        if (strategy == "keep") != (keep is not None and bool(keep.strip())):
            raise UsageError("give exactly one of --keep OBJECT, --ours, --theirs, --newest",
                             "e.g. `kledger resolve --keep Rome`")
        with self.store.transaction():
            pf = self.proposed(staged=True, pending=True)
            if strategy in ("ours", "theirs") and pf.pending is None:
                raise StateError(f"--{strategy} applies to a stopped merge or cherry-pick, and none is in progress",
                                 "use --keep OBJECT or --newest")
            found = self._conflicts_of(pf)
            if not found and pf.pending is None:
                raise StateError("there is no conflict to resolve",
                                 "`kledger conflicts [REV]` lists conflicts; `kledger check` checks HEAD")
            # (a stopped operation whose conflicts are gone, e.g. after `relation set --multi`, just finishes)
            targets = self._pick(found, conflict, keep if strategy == "keep" else None) if found else []
            src = self._sources(pf, [f for c in targets for f in c.fact_ids]) if strategy != "keep" else {}
            who, at = (author or self.env.default_author()).strip(), self.env.now()
            decided = []
            for c in targets:
                if strategy == "keep":
                    values = [normalize(keep)]
                else:
                    if strategy == "newest":
                        newest_age = max(src[f]["age"] for f in c.fact_ids)
                        chosen = [f for f in c.fact_ids if src[f]["age"] == newest_age]
                    else:
                        chosen = [f for f in c.fact_ids if src[f]["side"] == ("ours" if strategy == "ours" else "theirs")]
                    values = list(c.values_of(chosen))
                    if not values:
                        raise InputError(f"conflict {c.key[:10]} has no fact on {strategy} side", "use --keep OBJECT")
                    if len(values) > 1:
                        raise InputError(f"--{strategy} is ambiguous in conflict {c.key[:10]} "
                                         f"({' and '.join(repr(v) for v in values)})",
                                         f"name the object: `kledger resolve {c.key[:10]} --keep OBJECT`")
                kept, dropped = settle(c, keep=values)
                self.store.put_resolution(c.key, {**_conflict_id(c), "keep": values, "strategy": strategy,
                                                  "author": who, "at": at}, at)
                decided.append({**_conflict_id(c), "keep": values, "strategy": strategy,
                                "kept": sorted(kept), "dropped": sorted(dropped)})
            ops, left, entries = self._replay_decisions(pf.base, pf.ops, pf.involving, {c.key for c in targets})
            adds = {o.fact_id for o in ops if o.op == OP_ADD}
            blocking = [c for c in left if pf.pending is not None or set(c.fact_ids) & adds]
            cid = None
            if blocking:
                if pf.pending is not None:
                    body = {k: v for k, v in pf.pending.items() if k != "kind"}
                    self.store.set_pending(pf.kind, {**body, "conflicts": [c.key for c in blocking]})
            elif pf.pending is not None:
                p = pf.pending
                cid = self._new_commit(pf.parents, ops, message or p["message"], author or p.get("author"),
                                       meta={**p["meta"], "resolved": entries})
                self.store.set_pending(None)
            else:
                message = message or "Resolve " + "; ".join(
                    f"{d['subject']} · {d['relation']}: keep {', '.join(d['keep'])}" for d in decided)
                self.store.clear_staged()
                dropped = {f for d in decided for f in d["dropped"]} | {f for e in entries for f in e["dropped"]}
                stale = self._measured_with(pf.base, {f for d in decided for f in d["kept"]}, dropped)
                if stale:  # kept facts measured on top of the losers: measured again without them
                    ops = ops + [Op(OP_ADD, f) for f in sorted(stale)]
                if ops:  # the staging area with the decisions applied, committed as `commit` does
                    self.store.stage(ops)  # (on a model ledger, that measures the kept facts' constraints)
                    cid = self.commit(message, author, meta={"resolved": entries, **(
                        {"remeasured": sorted(stale)} if stale else {})}, measure_without=dropped | stale)
                else:  # only staged facts lost: the commit records the decision
                    cid = self._new_commit(pf.parents, ops, message, author, meta={"resolved": entries})
            self.env.fault_point("resolve")
        return {"context": pf.kind, "decided": decided, "commit": cid, "resolved": entries,
                "remaining": [_conflict_id(c) for c in blocking]}

    def _measured_with(self, base: dict[str, str], kept: set[str], dropped: set[str]) -> set[str]:
        """The facts of `kept` in force in `base` (fact → commit that put it in force) whose stored
        constraints were measured while one of `dropped` was in force (so their values pushed
        against it). Empty on a ledger without a model."""
        if not self.has_model or not dropped:
            return set()
        kept = {f for f in kept if f in base}
        measured_in = self.store.measured_in(sorted(kept))
        commits = self.store.commits({c for cs in measured_in.values() for c in cs}, with_ops=False)
        order = self.store.commit_order()
        out = set()
        for f in kept:
            cid = base[f] if base[f] in measured_in.get(f, ()) else max(measured_in.get(f, ()), default=None,
                                                                        key=lambda c: order.get(c, 0))
            if cid is None or not commits[cid].parents:
                continue
            if dropped & set(self.state(commits[cid].parents[0])):
                out.add(f)
        return out

    def forget_decision(self, key_prefix: str) -> dict:
        """Forget a recorded decision (by conflict key or a prefix of it): it is no longer replayed."""
        prefix = key_prefix.strip().lower()
        with self.store.transaction():
            keys = self.store.resolutions_with_prefix(prefix) if looks_like_id(prefix) else []
            if len(keys) != 1:
                raise InputError(f"{'no' if not keys else len(keys)} recorded decision(s) match {key_prefix!r}",
                                 "give the conflict key (see `kledger show` of the resolution commit: meta.resolved)")
            body = self.store.resolution(keys[0])
            self.store.delete_resolution(keys[0])
        return {"conflict": keys[0], **body}

    # ================================================================ integrity
    def fsck(self) -> dict:
        problems: list[str] = []
        n_facts = 0
        for stored_id, fact in self.store.fact_rows():
            n_facts += 1
            if fact_id(fact.to_dict()) != stored_id:
                problems.append(f"fact {short(stored_id)}: content does not match its id")
        g = self.graph()
        commits = self.store.commits(list(g))
        for cid, c in commits.items():
            if commit_id(c.payload()) != cid:
                problems.append(f"commit {short(cid)}: content does not match its id")
            for p in c.parents:
                if p not in g:
                    problems.append(f"commit {short(cid)}: parent {short(p)} is missing")
        measured: dict[str, list] = {}
        for con in self.store.constraints(list(g)):
            measured.setdefault(con.commit_id, []).append(con)
        for cid, c in commits.items():
            if (c.constraints or None) != constraints_hash(measured.get(cid, ())):
                problems.append(f"commit {short(cid)}: stored constraints do not match its constraints hash")
        for cid, fid in self.store.dangling_ops():
            problems.append(f"commit {short(cid)}: fact {short(fid)} is missing")
        for name, cid in self.store.refs().items():
            if cid not in g:
                problems.append(f"branch {name}: points at missing commit {short(cid)}")
        head = self.store.head()
        if not head.startswith("ref: ") and head not in g:
            problems.append(f"HEAD points at missing commit {short(head)}")
        return {"ok": not problems, "facts": n_facts, "commits": len(commits), "problems": problems}

    # ================================================================ text export / replay
    def export(self, out_dir: str | os.PathLike) -> dict:
        """Write the history as text: `commits.jsonl` (one commit per line, facts inline) and
        `refs.json`. `Ledger.init_from` replays it into a new ledger."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        order = self.store.commit_order()
        ids = sorted(order, key=order.get)
        commits = self.store.commits(ids)
        facts = self.store.facts(o.fact_id for c in commits.values() for o in c.ops)
        with open(out / "commits.jsonl", "w", encoding="utf-8") as fh:
            for cid in ids:
                c = commits[cid]
                rec = {"id": cid, "parents": list(c.parents), "message": c.message, "author": c.author,
                       "timestamp": c.timestamp, "meta": c.meta,
                       "ops": [{"op": o.op, "fact": facts[o.fact_id].to_dict()} for o in c.ops]}
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        refs = {"model": self.model, "head": self.store.head(), "branches": self.store.refs(),
                "relations": self.store.relations(),
                "decisions": [{"conflict": k, "created": c, **b} for k, b, c in self.store.resolutions()]}
        thr = self.store.meta("soft_threshold")
        if thr is not None:
            refs["soft_threshold"] = thr
        (out / "refs.json").write_text(json.dumps(refs, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return {"commits": len(ids), "facts": len(facts), "path": str(out)}

    @classmethod
    def init_from(cls, path: str | os.PathLike, source: str | os.PathLike, model: str | None = None,
                  settings: dict | None = None, progress=None, env: Settings | None = None) -> "Ledger":
        src = Path(source)
        commits_file, refs_file = src / "commits.jsonl", src / "refs.json"
        if not commits_file.is_file() or not refs_file.is_file():
            raise InputError(f"{src} is not a text ledger (needs commits.jsonl and refs.json)",
                             "give a directory written by `kledger export`, e.g. ledgers/NAME")
        records = _read_jsonl(commits_file)
        try:
            refs = json.loads(refs_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{refs_file}: malformed JSON ({exc})", "fix or re-export the file") from exc
        # Validate everything before the ledger is created: a bad file leaves nothing behind.
        mapped: dict[str, str] = {}
        plan = []
        for n, rec in enumerate(records, 1):
            try:
                ops = [(o["op"], Fact.create(**_fact_args(o["fact"]))) for o in rec["ops"]]
                if any(op not in (OP_ADD, OP_RETRACT) for op, _ in ops):
                    raise InputError("unknown op", "ops are 'add' or 'retract'")
                parents = [mapped[p] for p in rec["parents"]]
                commit = Commit(parents=tuple(parents), ops=tuple(Op(op, f.id) for op, f in ops),
                                message=rec["message"], author=rec["author"], timestamp=rec["timestamp"],
                                meta=rec.get("meta") or {})
            except KledgerError as exc:
                raise InputError(f"{commits_file}:{n}: {exc.message}", exc.hint) from exc
            except (KeyError, TypeError) as exc:
                raise InputError(f"{commits_file}:{n}: missing or malformed field {exc}",
                                 "each line needs id, parents, message, author, timestamp, ops") from exc
            mapped[rec.get("id", str(n))] = commit.id
            plan.append((commit, ops))
        _check_refs(refs, mapped, refs_file)
        ledger = cls.init(path, model=model or refs.get("model"), settings=settings, env=env)
        try:
            with ledger.store.transaction():
                # On a ledger with a model, facts that no earlier commit measured are measured
                # against apply(their commit's parent) as the history is replayed (sequential
                # editing), so ids change with the constraints they now cover; `remap` follows.
                remap: dict[str, str] = {}
                for commit, ops in plan:
                    ledger.store.put_facts([f for _, f in ops])
                    parents = tuple(remap[p] for p in commit.parents)
                    ledger._changed()
                    digest, rows = ledger._measure(parents[0] if parents else None,
                                                   [f for op, f in ops if op == OP_ADD], progress, skip_known=True)
                    new_id = ledger.store.put_commit(replace(commit, parents=parents, constraints=digest))
                    ledger._store_constraints(new_id, rows)
                    remap[commit.id] = new_id
                final = {text_id: remap[cid] for text_id, cid in mapped.items()}
                for name, cid in (refs.get("branches") or {}).items():
                    ledger.store.set_ref(check_branch_name(name), final[cid])
                head = refs.get("head") or f"ref: {DEFAULT_BRANCH}"
                ledger.store.set_head(head if head.startswith("ref: ") else final[head])
                for key, rel in (refs.get("relations") or {}).items():
                    ledger.store.set_relation(key, bool(rel.get("multi")), rel.get("inverse_of"))
                for d in refs.get("decisions") or []:  # remembered decisions (rerere) travel too
                    body = {k: v for k, v in d.items() if k not in ("conflict", "created")}
                    ledger.store.put_resolution(d["conflict"], body, d.get("created") or body.get("at") or "")
                if refs.get("soft_threshold") is not None and ledger.has_model:
                    ledger.store.set_meta("soft_threshold", str(refs["soft_threshold"]))
        except BaseException:
            ledger.close()
            shutil.rmtree(ledger.path, ignore_errors=True)
            raise
        ledger._changed()
        return ledger


def _pair_changes(added: list[str], removed: list[str], facts: dict[str, Fact]):
    """Pair added and removed facts with the same matching (subject, relation) as changes."""
    by_key: dict[tuple, list[str]] = {}
    for i in removed:
        by_key.setdefault(facts[i].key, []).append(i)
    changed, plain = [], []
    for i in added:
        olds = by_key.get(facts[i].key)
        if olds:
            changed.append((olds.pop(0), i))
        else:
            plain.append(i)
    paired = {old for old, _ in changed}
    return plain, [i for i in removed if i not in paired], changed


def _check_refs(refs: object, mapped: dict[str, str], refs_file: Path) -> None:
    """Validate refs.json before anything is created."""
    def bad(what: str) -> InputError:
        return InputError(f"{refs_file}: {what}", "fix the file or re-export the ledger with `kledger export`")

    if not isinstance(refs, dict):
        raise bad("expected a JSON object with 'branches' and 'head'")
    branches = refs.get("branches") or {}
    if not isinstance(branches, dict):
        raise bad("'branches' must map branch names to commit ids")
    for name, cid in branches.items():
        check_branch_name(name)
        if cid not in mapped:
            raise bad(f"branch {name!r} points at {str(cid)[:12]!r}, which is not in commits.jsonl")
    head = refs.get("head") or f"ref: {DEFAULT_BRANCH}"
    if not isinstance(head, str) or not (head.startswith("ref: ") or head in mapped):
        raise bad(f"'head' must be 'ref: BRANCH' or a commit id in commits.jsonl, got {head!r}")
    if not isinstance(refs.get("relations") or {}, dict):
        raise bad("'relations' must be an object")
    decisions = refs.get("decisions") or []
    if not isinstance(decisions, list) or not all(
            isinstance(d, dict) and isinstance(d.get("conflict"), str) and isinstance(d.get("keep"), list)
            for d in decisions):
        raise bad("'decisions' must be a list of objects with 'conflict' and 'keep'")
    thr = refs.get("soft_threshold")
    if thr is not None and thr != "off":
        try:
            ok = 0 < float(thr) <= 1
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise bad(f"'soft_threshold' must be a cosine in (0, 1] or 'off', got {thr!r}")


def _fact_args(d: dict) -> dict:
    return {"prompt": d["prompt"], "target": d["target"], "subject": d["subject"],
            "relation": d.get("relation"), "target_true": d.get("target_true"),
            "paraphrases": d.get("paraphrases") or (), "neighborhood": d.get("neighborhood") or (),
            "extra": d.get("extra") or {}}


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text", "save the file as UTF-8") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{n}: malformed JSON ({exc.msg} at column {exc.colno})",
                             "fix that line or re-export the ledger") from exc
    return out


def _relation_arg(relation: str) -> str:
    if not isinstance(relation, str) or not relation.strip():
        raise InputError("empty relation", "give a relation id (e.g. P36) or a template with {} for the subject")
    return relation_key(relation)


def _conflict_id(c: Conflict) -> dict:
    return {"conflict": c.key, "kind": c.kind, "subject": c.subject, "relation": c.relation,
            "objects": list(c.objects)}


def _target(pf: ProposedFacts) -> dict:
    p = pf.pending or {}
    return {"kind": pf.kind, "commit": pf.commit, "theirs": p.get("theirs"),
            "staged": len(pf.ops) if pf.kind == "staged" else 0}


def describe(conflict: Conflict, facts: dict[str, Fact]) -> str:
    fs = [facts[i] for i in conflict.fact_ids if i in facts]
    if not fs:
        return conflict.subject
    if conflict.kind != "hard":
        return (f"{conflict.kind} conflict on {conflict.subject!r} / {conflict.relation!r}: "
                + " vs ".join(f"{f.prompt!r} → {f.target!r}" for f in fs))
    objs = " vs ".join(repr(f.target) for f in fs)
    return f"{fs[0].subject!r} / {fs[0].relation!r}: {objs}"

