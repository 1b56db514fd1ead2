"""The Ledger facade: the library API behind every command, one short method per verb.

Every change to the ledger happens inside one store transaction (here or in kledger.commits), so
a failed command leaves the ledger as it was. The work is done by the modules below it
(docs/architecture.md): `history` (revisions, facts in force, the read verbs), `decisions`
(conflicts and what is decided about them), `commits` (every path that writes a commit),
`transfer` (text ledgers), `integrity` (fsck), and `model_side`, the glue to the model
(`kledger.edit`: torch, imported only when a verb needs the model).
It never prints; errors are typed (kledger.errors).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator

from . import __version__, commits, integrity, transfer
from .conflicts import SOFT_THRESHOLD, Conflict
from .decisions import STRATEGIES, Decisions, ProposedFacts, conflict_id, parse_threshold, relation_arg, target_of
from .errors import InputError, LedgerNotFound, StateError, UsageError
from .history import FactChange, History, apply_ops, check_branch_name  # noqa: F401  (re-exported)
from .model_side import CACHE_SECRET, DEFAULTS_VERSION_KEY
from .records import OP_ADD, OP_RETRACT, Fact, Op, looks_like_id
from .settings import DEFAULT_BRANCH, DEFAULT_MODEL, Settings
from .sharing import RemoteVerbs
from .store import DB_NAME, LEDGER_DIR, Store


class Ledger(RemoteVerbs):
    """A ledger on disk. Open with `Ledger.open()` (read) or `Ledger.open(write=True)`."""

    def __init__(self, store: Store, env: Settings | None = None):
        self.store = store
        self.env = env or Settings.from_env()
        self.model: str = store.meta("model") or DEFAULT_MODEL  # fixed when the ledger is made
        self.has_model = self.model not in ("", "none")
        # False for a ledger replayed with `init --from --no-measure`: its commits carry no
        # constraints, so it can be checked but not edit the model (model_side.editor refuses)
        self.measured = store.meta("measure") != "off"
        self.history = History(store)
        self.decisions = Decisions(store, self.history, self.has_model)
        self._editor = None

    # ================================================================ opening
    @classmethod
    def init(cls, path: str | os.PathLike = ".", model: str | None = None, settings: dict | None = None,
             env: Settings | None = None, check_model: bool = True) -> "Ledger":
        """Make a ledger. `settings` may hold "hparams" (overrides of the model's defaults) and
        "corpus" (a text file for C0). It is built in a temporary folder beside PATH/.kledger and
        moved there when complete (`_new_ledger_dir`): a failure leaves PATH as it was. With
        `check_model`, a model that cannot be found offline is refused first."""
        env = env or Settings.from_env()
        root, ldir, meta = _new_ledger_meta(path, model, settings, env)
        if check_model:
            from .model_side import check_loadable

            check_loadable(meta["model"], env)
        with _new_ledger_dir(root, ldir) as tmp:
            Store.create(tmp, meta, wait=env.lock_wait).close()
        return cls(Store.open(ldir, write=True, wait=env.lock_wait), env)

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

    def _changed(self) -> None:
        self.history.changed()

    # ================================================================ settings
    def soft_threshold(self) -> float | None:
        return self.decisions.soft_threshold()

    def set_soft_threshold(self, value: str) -> dict:
        """Set the soft-conflict threshold: a cosine in (0, 1], "off", or "default"."""
        stored = parse_threshold(value)
        with self.store.transaction():
            self.store.set_meta("soft_threshold", stored)
        return self.config()

    def config(self) -> dict:
        """The ledger's settings (read-only ones included)."""
        thr = self.soft_threshold()
        return {"model": self.model, "soft_threshold": "off" if thr is None and self.has_model else thr,
                "hparams": json.loads(self.store.meta("hparams") or "{}"), "corpus": self.store.meta("corpus")}

    # ================================================================ revisions (history)
    def graph(self) -> dict[str, tuple[str, ...]]:
        return self.history.graph()

    def current_branch(self) -> str | None:
        return self.history.current_branch()

    def head(self) -> str | None:
        return self.history.head()

    def resolve(self, rev: str | None = "HEAD") -> str:
        return self.history.resolve(rev)

    def first_parent_chain(self, cid: str | None) -> list[str]:
        return self.history.first_parent_chain(cid)

    def state(self, cid: str | None) -> dict[str, str]:
        return self.history.state(cid)

    def log(self, rev: str | None = "HEAD", limit: int | None = None, subject: str | None = None,
            relation: str | None = None, all_refs: bool = False) -> list[dict]:
        return self.history.log(rev, limit, subject, relation, all_refs)

    def show(self, rev: str = "HEAD") -> dict:
        return self.history.show(rev)

    def diff(self, rev_a: str | None = None, rev_b: str | None = None, with_facts: bool = True) -> dict:
        return self.history.diff(rev_a, rev_b, with_facts)

    def blame(self, subject: str, relation: str | None = None, rev: str = "HEAD") -> list[dict]:
        return self.history.blame(subject, relation, rev)

    def branches(self, remote: bool = False) -> list[dict]:
        return self.history.branches(remote)

    # ================================================================ staging
    def add(self, facts: list[Fact]) -> dict:
        """Stage facts to add. Facts already in force at HEAD or already staged are skipped."""
        if not facts:
            raise InputError("no facts to add", "give PROMPT TARGET --subject S, or --file F")
        with self.store.transaction():
            skip = set(self.history.state_of(self.head(), [f.id for f in facts]))
            skip |= {o.fact_id for o in self.store.staged()}
            new = []
            for f in facts:
                if f.id not in skip:
                    skip.add(f.id)
                    new.append(f)
            self.store.put_facts(new)
            self.store.stage([Op(OP_ADD, f.id) for f in new])
        return {"staged": len(new), "skipped": len(facts) - len(new), "fact_ids": [f.id for f in new]}

    def remove(self, subject: str, relation: str | None = None) -> dict:
        """Stage the retraction of the facts in force at HEAD about `subject` (and `relation`)."""
        ids = sorted(self.history.state_of(self.head(), self.store.fact_ids_matching(subject, relation)))
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
        return {"branch": self.current_branch(), "head": head,
                "facts_in_force": self.history.count_in_force(head),
                "staged": [{"op": o.op, "fact_id": o.fact_id, **facts[o.fact_id].to_dict()} for o in staged],
                "pending": self.store.pending(), "model": self.model, "upstream": self._upstream()}

    # ================================================================ committing
    def commit(self, message: str, author: str | None = None, allow_conflicts: bool = False,
               compute: bool | None = None, progress=None, meta: dict | None = None,
               measure_without: Iterable[str] = ()) -> str:
        """Commit the staged changes (kledger.commits.commit); the new commit id."""
        return commits.commit(self, message, author, allow_conflicts, compute, progress, meta, measure_without)

    def replay(self, base: str | None = None, author: str | None = None, progress=None) -> dict:
        """Measure HEAD's commits after `base` afresh on their new parents, as new commits."""
        return commits.replay(self, base, author, progress)

    # ================================================================ the model (kledger.model_side)
    def editor(self, progress=None, **options):
        """The ledger's model side, a kledger.edit.editor.Editor (see model_side.editor)."""
        from . import model_side

        return model_side.editor(self, progress, **options)

    def apply(self, rev: str | None = "HEAD", mode: str = "accumulated", out_dir: Path | None = None,
              delta: Path | None = None, progress=None, force: bool = False, lora: Path | None = None,
              rank: int | None = None) -> dict:
        """Solve the constraints in force at `rev` and write the edited model, its delta or a LoRA
        adapter (the `kledger apply` document); see kledger.model_side.apply (`force`: replace a
        directory or file that kledger did not write)."""
        from . import model_side

        return model_side.apply(self, rev, mode, out_dir, delta, progress, force, lora, rank)

    def ask(self, prompt: str, rev: str | None = "HEAD", mode: str = "accumulated", top: int = 5,
            max_new_tokens: int = 8, progress=None) -> dict:
        """The model's answer at `rev` beside the base model's (the `kledger ask` document)."""
        from . import model_side

        return model_side.ask(self, prompt, rev, mode, top, max_new_tokens, progress)

    def evaluate(self, rev: str | None = "HEAD", opts=None, progress=None, **options) -> dict:
        """Metrics at `rev` beside the base model (the `kledger eval` document); `opts` from
        `Ledger.eval_options`, or its fields as keyword `options`."""
        from . import model_side

        return model_side.evaluate(self, rev, opts or model_side.EvalOptions(**options), progress)

    @staticmethod
    def eval_options(**options):
        """What `evaluate` measures (kledger.model_side.EvalOptions), checked before any ledger
        is opened: mode, data, fmt, limit, text, ppl_tokens, gen_tokens, batch_size, history,
        plot, plot_title."""
        from .model_side import EvalOptions

        return EvalOptions(**options).check()

    @staticmethod
    def eval_metrics() -> tuple[tuple[str, ...], dict[str, str], dict[str, tuple[str, ...]]]:
        """(record kinds, their titles, each kind's summary metrics in display order) of `evaluate`."""
        from .edit.evaluate import GROUP_METRICS, KIND_TITLES, KINDS

        return KINDS, KIND_TITLES, GROUP_METRICS

    # ================================================================ branches
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
        commits.require_no_pending(self)
        with self.store.transaction():
            if create:
                cid = self.resolve(start) if start is not None else self.head()
                check_branch_name(target)
                if self.store.ref(target) is not None:
                    raise StateError(f"branch {target!r} already exists", "check it out without -b")
                if cid is not None:
                    self.store.set_ref(target, cid)
                self.store.set_head(f"ref: {target}")
                out = {"branch": target, "head": cid}
            elif self.store.ref(target) is not None:
                self.store.set_head(f"ref: {target}")
                out = {"branch": target, "head": self.store.ref(target)}
            elif len(seen := [c for n, c in self.history.tracking().items() if n.split("/", 1)[1] == target]) == 1:
                self.store.set_ref(target, seen[0])  # as git does: a new branch at the one remote's branch of that name
                self.store.set_head(f"ref: {target}")
                out = {"branch": target, "head": seen[0]}
            else:
                cid = self.resolve(target)
                self.store.set_head(cid)
                out = {"branch": None, "head": cid}
            self._changed()
        return out

    # ================================================================ rearranging
    def revert(self, rev: str, author: str | None = None, message: str | None = None,
               allow_conflicts: bool = False) -> str:
        return commits.revert(self, rev, author, message, allow_conflicts)

    def cherry_pick(self, rev: str, author: str | None = None, allow_conflicts: bool = False) -> str:
        return commits.cherry_pick(self, rev, author, allow_conflicts)

    def merge(self, branch: str, author: str | None = None, message: str | None = None,
              no_ff: bool = False, allow_conflicts: bool = False) -> dict:
        return commits.merge(self, branch, author, message, no_ff, allow_conflicts)

    def abort(self, kind: str | None = None) -> dict:
        pending = self.store.pending()
        if pending is None or (kind and pending["kind"] != kind):
            raise StateError(f"no {kind or 'merge or cherry-pick'} in progress", "nothing to abort")
        with self.store.transaction():
            self.store.set_pending(None)
        return pending

    # ================================================================ conflicts, decisions, relations
    def relation_rules(self) -> tuple[set[str], dict[str, str]]:
        return self.decisions.relation_rules()

    def relations(self) -> list[dict]:
        return self.decisions.relations()

    def set_multi(self, relation: str, multi: bool) -> dict:
        """Declare a relation multi-valued (several objects per subject are no contradiction) or
        single-valued again (the default)."""
        key = relation_arg(relation)
        with self.store.transaction():
            self.store.set_relation(key, multi=multi)
        return self.decisions.relation(key)

    def set_inverse(self, relation: str, other: str | None) -> dict:
        """Declare `relation` and `other` inverse of each other (a relation may be its own inverse);
        with `other` None, remove `relation`'s inverse declaration. A relation has one inverse: an
        older declaration of either is replaced."""
        key = relation_arg(relation)
        with self.store.transaction():
            self.decisions.set_inverse(key, other)
        return self.decisions.relation(key)

    def conflicts_in(self, ids: Iterable[str], involving: Iterable[str] | None = None) -> list[Conflict]:
        return self.decisions.conflicts_in(ids, involving)

    def proposed(self, rev: str | None = None, staged: bool = False, pending: bool = False,
                 lazy: bool = False) -> ProposedFacts:
        return self.decisions.proposed(rev, staged, pending, lazy)

    def conflicts(self, rev: str | None = None, staged: bool = False) -> dict:
        """Every conflict in REV; with no REV, in the stopped merge or cherry-pick if there is one,
        else at HEAD with the staged facts."""
        d = self.decisions
        pf = d.proposed(rev, staged=staged or rev is None, pending=rev is None and not staged, lazy=True)
        with d.new_keys(self._staged_keys(pf)[0]):
            found = d.conflicts_of(pf)
            collisions = d.collisions_of(pf)
        return {"target": target_of(pf), "facts": pf.n_facts, "conflicts": d.report(pf, found),
                "collisions": collisions}

    def _staged_keys(self, pf) -> tuple[dict, bool]:
        """(first-layer keys of the staged facts no commit has measured, whether every staged fact
        has keys for soft conflicts): measured on the model as `commit` will, so that `check
        --staged` and `commit` give one verdict. Without torch (a CI gate installed without the
        `edit` extra) or without the model they cannot be measured: ({}, False), and `check` says
        so."""
        adds = [o.fact_id for o in pf.ops if o.op == OP_ADD]
        if not adds:
            return {}, True
        from . import model_side
        from .errors import ModelError

        try:
            return model_side.first_keys(self, list(self.store.facts(adds).values())), True
        except ModelError:  # the model side is not installed, or the model cannot be loaded here
            return {}, False

    def check(self, rev: str | None = None, staged: bool = False) -> dict:
        """The CI gate: unresolved conflicts in the facts in force at REV (default HEAD), or, with
        `staged`, in what `kledger commit` would make of HEAD and the staged facts (remembered
        decisions replayed, as the commit would). `ok` is True when there are none. `soft_checked`
        is False when soft conflicts could not be looked for: no model, the threshold off, or no
        keys (a ledger replayed with `init --from --no-measure`)."""
        d = self.decisions
        pf = d.proposed(rev, staged=staged, lazy=True)
        keys, keyed = self._staged_keys(pf)
        with d.new_keys(keys):
            found = d.conflicts_of(pf)
            replayed: list[dict] = []
            incoming = set(pf.incoming)
            touching = [c.key for c in found if incoming.intersection(c.fact_ids)]
            if self.store.resolutions_of(touching):
                pf.base = self.state(pf.commit)  # replay as `commit` would, then look again
                pf.ops, _, replayed = d.replay(pf.base, pf.ops, incoming)
                found = d.conflicts_of(pf)
            collisions = d.collisions_of(pf)
        return {"ok": not found, "target": target_of(pf), "facts": pf.n_facts,
                "unresolved": len(found), "conflicts": d.report(pf, found), "replayed": replayed,
                "collisions": collisions,
                "soft_checked": self.measured and self.soft_threshold() is not None and keyed}

    def resolve_conflicts(self, conflict: str | None = None, keep: str | None = None, strategy: str = "keep",
                          message: str | None = None, author: str | None = None) -> dict:
        """Decide conflicts and commit the decision, in one transaction.

        Where: the stopped merge or cherry-pick if there is one, else HEAD with the staged facts.
        Which: `conflict` (a key prefix or a subject), else the one conflict that has the object
        `keep`, else (ours, theirs, newest) all that have no recorded decision yet. How (`strategy`):
        "keep" the facts that claim `keep`; "ours" or "theirs" (a stopped operation only); "newest"
        (the facts from the latest commit, staged facts being newer than any). Each decision is
        recorded in `resolutions` (kept objects, who, when) and replayed whenever the same conflict
        comes back. The losing facts are not in force after the commit: the incoming add ops are
        left out, the others retracted. The commit (the merge or cherry-pick itself, or a commit of
        the staged facts and retractions on HEAD) lists the decisions in `meta.resolved`. When
        conflicts that block it remain, the decisions are recorded and no commit is made yet."""
        if strategy not in STRATEGIES:
            raise UsageError(f"unknown strategy {strategy!r}", "use --keep, --ours, --theirs or --newest")
        if (strategy == "keep") != (keep is not None and bool(keep.strip())):
            raise UsageError("give exactly one of --keep OBJECT, --ours, --theirs, --newest",
                             "e.g. `kledger resolve --keep Rome`")
        d = self.decisions
        with self.store.transaction():
            pf = d.proposed(staged=True, pending=True)
            if strategy in ("ours", "theirs") and pf.pending is None:
                raise StateError(f"--{strategy} applies to a stopped merge or cherry-pick, and none is in progress",
                                 "use --keep OBJECT or --newest")
            with d.new_keys(self._staged_keys(pf)[0]):  # staged facts' soft conflicts, as commit sees them
                found = d.conflicts_of(pf)
                if not found and pf.pending is None:
                    raise StateError("there is no conflict to resolve",
                                     "`kledger conflicts [REV]` lists conflicts; `kledger check` checks HEAD")
                # (a stopped operation whose conflicts are gone, e.g. after `relation set --multi`, just finishes)
                targets = d.pick(found, conflict, keep if strategy == "keep" else None) if found else []
                decided = d.decide(pf, targets, strategy, keep, (author or self.env.default_author()).strip(),
                                   self.env.now())
                ops, left, entries = d.replay(pf.base, pf.ops, pf.involving, {c.key for c in targets})
                adds = {o.fact_id for o in ops if o.op == OP_ADD}
                blocking = [c for c in left if pf.pending is not None or set(c.fact_ids) & adds]
                cid = commits.commit_decisions(self, pf, ops, decided, entries, blocking, message, author)
            self.env.fault_point("resolve")
        return {"context": pf.kind, "decided": decided, "commit": cid, "resolved": entries,
                "remaining": [conflict_id(c) for c in blocking]}

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

    # ================================================================ integrity, text ledgers
    def fsck(self) -> dict:
        return integrity.fsck(self.store, self.history)

    def export(self, out_dir: str | os.PathLike) -> dict:
        """Write the history as text (kledger.transfer); `Ledger.init_from` replays it."""
        return transfer.write(self.store, out_dir, self.model)

    def report(self, out_file: str | os.PathLike, rev: str | None = None, all_refs: bool = False,
               evals: Iterable[str | os.PathLike] = ()) -> dict:
        """Write the audit page of REV's history (kledger.report): one self-contained HTML file."""
        from . import report

        return report.write(self, Path(out_file), rev, all_refs, [Path(p) for p in evals])

    @classmethod
    def init_from(cls, path: str | os.PathLike, source: str | os.PathLike, model: str | None = None,
                  settings: dict | None = None, progress=None, env: Settings | None = None,
                  measure: bool = True) -> "Ledger":
        """A new ledger replaying a text ledger. On a ledger with a model, facts that no earlier
        commit measured are measured against apply(their commit's parent) as the history is
        replayed (sequential editing), so commit ids change with the constraints they now cover.
        Without `measure`, the model is recorded but neither loaded nor measured (no torch): the
        ledger can be checked (conflicts, log, fsck...) but not edit the model (`measured` False)."""
        env = env or Settings.from_env()
        _checked_settings(settings or {})  # everything is checked before the ledger is created
        plan = transfer.read(source)
        root, ldir, meta = _new_ledger_meta(path, model or plan.model, settings, env)
        if not measure and meta["model"] not in ("", "none"):
            meta["measure"] = "off"
        elif measure:
            from .model_side import check_loadable

            check_loadable(meta["model"], env)
        with _new_ledger_dir(root, ldir) as tmp:  # built beside PATH/.kledger, moved there when complete
            with cls(Store.create(tmp, meta, wait=env.lock_wait), env) as ledger, ledger.store.transaction():
                remap: dict[str, str] = {}
                for commit, ops in plan.commits:
                    ledger.store.put_facts([f for _, f in ops])
                    parents = tuple(remap[p] for p in commit.parents)
                    remap[commit.id] = commits.put_measured(ledger, replace(commit, parents=parents), progress,
                                                            skip_known=True, measure=ledger.measured)
                final = {text_id: remap[cid] for text_id, cid in plan.ids.items()}
                transfer.restore_refs(ledger.store, plan, final, ledger.has_model)
                env.fault_point("init-from")
        return cls(Store.open(ldir, write=True, wait=env.lock_wait), env)


def _new_ledger_meta(path: str | os.PathLike, model: str | None, settings: dict | None,
                     env: Settings) -> tuple[Path, Path, dict[str, str]]:
    """(PATH, PATH/.kledger, the new ledger's meta rows) for `init`, everything checked and
    nothing created yet."""
    checked = _checked_settings(settings or {})
    root = Path(path).expanduser().resolve()
    ldir = root / LEDGER_DIR
    if (ldir / DB_NAME).exists():
        raise StateError(f"a ledger already exists in {ldir}", "use it, or remove that directory first")
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root} is not a directory", "give a directory to create the ledger in")
    if ldir.exists() and not ldir.is_dir():
        raise UsageError(f"{ldir} exists and is not a directory", "move that file away, or give another PATH")
    if os.path.lexists(ldir / (DB_NAME + ".wal")):  # DuckDB would replay it into the new database
        raise StateError(f"{ldir} holds a stray {DB_NAME}.wal from an earlier ledger",
                         "move that file away (it is not a ledger without its database), then run init again")
    meta = {"HEAD": f"ref: {DEFAULT_BRANCH}", "model": model or env.model or DEFAULT_MODEL,
            "created": env.now(), "created_by": f"kledger {__version__}"}
    if meta["model"] not in ("", "none"):
        import secrets

        from .edit.hparams import DEFAULTS_VERSION

        meta["soft_threshold"] = str(SOFT_THRESHOLD)
        meta[CACHE_SECRET] = secrets.token_hex(32)  # the key of the apply cache's MACs
        meta[DEFAULTS_VERSION_KEY] = str(DEFAULTS_VERSION)  # the edit defaults it measures with, for good
    meta.update(checked)
    return root, ldir, meta


@contextmanager
def _new_ledger_dir(root: Path, ldir: Path) -> Iterator[Path]:
    """A temporary directory beside `ldir` (in `root`) to build a new ledger in, moved into `ldir`
    when the block ends without an error. On an error, what this made is removed (the temporary
    directory, and the folders of `root` that did not exist); nothing that was there is touched.
    A process killed inside the block leaves only the temporary `.kledger.new-*` beside `ldir`."""
    made = [d for d in (root, *root.parents) if not d.exists()]
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=LEDGER_DIR + ".new-", dir=root))
        yield tmp
        _move_into(tmp, ldir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in made:  # deepest first; only if still empty
            with suppress(OSError):
                d.rmdir()
        raise


def _move_into(src: Path, dst: Path) -> None:
    """Move what the directory `src` holds into `dst` without replacing anything there: a missing
    (or empty) `dst` takes `src` by one rename; else entry by entry, into the folders both have,
    the database last (it is what makes a ledger). A file `dst` has already is kept."""
    try:
        os.rename(src, dst)
        return
    except OSError:
        if not dst.is_dir():
            raise
    for item in sorted(src.iterdir(), key=lambda p: p.name == DB_NAME):
        target = dst / item.name
        if item.name == DB_NAME:
            try:
                os.link(item, target)  # fails if a ledger appeared meanwhile: never replaces one
            except FileExistsError:
                raise StateError(f"a ledger already exists in {dst}", "use it, or remove that directory first") from None
            item.unlink()
        elif item.is_dir() and not item.is_symlink() and target.is_dir():
            _move_into(item, target)
        elif not os.path.lexists(target):
            os.rename(item, target)
    shutil.rmtree(src)


def find_ledger_dir(start: Path | None = None, explicit: str | os.PathLike | None = None) -> Path:
    """The `.kledger` directory: `explicit` (a ledger dir or the project dir holding one; the CLI
    passes --ledger or $KLEDGER_DIR), else the nearest one from `start` (default: the current
    directory) upward, like git."""
    if explicit is not None:
        p = Path(explicit).expanduser().resolve()
        for cand in (p, p / LEDGER_DIR):
            if (cand / DB_NAME).is_file():
                return cand
        raise LedgerNotFound(f"no kledger ledger at {p}", "run `kledger init` there, or check --ledger")
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / LEDGER_DIR / DB_NAME).is_file():
            return d / LEDGER_DIR
    raise LedgerNotFound(f"not inside a kledger ledger (searched {here} and its parents)",
                         "run `kledger init` first, or pass --ledger DIR")


def _checked_settings(settings: dict) -> dict[str, str]:
    """The meta rows of `init`'s settings, checked before anything is created: hyper-parameter
    names and values (kledger.edit.hparams, no torch) and that the corpus file exists."""
    meta = {}
    if settings.get("hparams"):
        from .edit.hparams import HParams

        hp = settings["hparams"]
        try:
            HParams.from_dict({k: tuple(v) if k == "layers" and isinstance(v, list) else v for k, v in hp.items()})
        except (TypeError, ValueError) as exc:  # a value of the wrong type, e.g. lam=abc
            raise InputError(f"bad hyper-parameter value: {exc}", "give numbers where numbers go, e.g. --set lam=5000") from None
        meta["hparams"] = json.dumps(hp, sort_keys=True)
    if settings.get("corpus"):
        corpus = Path(settings["corpus"]).expanduser()
        if not corpus.is_file():
            raise InputError(f"corpus file {corpus} does not exist", "give a UTF-8 text file")
        meta["corpus"] = str(corpus.resolve())
    return meta
