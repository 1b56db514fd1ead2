"""Text ledgers: a history written as text (`kledger export`) and read back (`kledger init --from`).

A text ledger is a directory with `commits.jsonl` (one commit a line, oldest first, facts inline)
and `refs.json` (branches, HEAD, model, relations, remembered decisions, soft threshold). `read`
validates everything and returns a `TextLedger` plan before anything is created; the facade
(`Ledger.init_from`) carries it out. `write` is the export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, KledgerError
from .history import check_branch_name
from .records import OP_ADD, OP_RETRACT, Commit, Fact, Op
from .settings import DEFAULT_BRANCH
from .store import Store


@dataclass
class TextLedger:
    """A validated text ledger. `commits`: (commit as written, with parents mapped to the ids
    of the commits read before it; its facts, each with its op), oldest first. `ids`: the text's
    commit id → the id of the commit as read."""

    commits: list[tuple[Commit, list[tuple[str, Fact]]]] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)
    refs: dict = field(default_factory=dict)

    @property
    def model(self) -> str | None:
        return self.refs.get("model")

    @property
    def head(self) -> str:
        return self.refs.get("head") or f"ref: {DEFAULT_BRANCH}"


def read(source: str | Path) -> TextLedger:
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
    plan = TextLedger()
    for n, rec in enumerate(records, 1):
        try:
            commit, ops = _commit(rec, plan.ids)
        except KledgerError as exc:
            raise InputError(f"{commits_file}:{n}: {exc.message}", exc.hint) from exc
        except (KeyError, TypeError) as exc:
            raise InputError(f"{commits_file}:{n}: missing or malformed field {exc}",
                             "each line needs id, parents, message, author, timestamp, ops") from exc
        plan.ids[rec.get("id", str(n))] = commit.id
        plan.commits.append((commit, ops))
    _check_refs(refs, plan.ids, refs_file)
    plan.refs = refs
    return plan


def _commit(rec: dict, ids: dict[str, str]) -> tuple[Commit, list[tuple[str, Fact]]]:
    ops = [(o["op"], Fact.create(**_fact_args(o["fact"]))) for o in rec["ops"]]
    if any(op not in (OP_ADD, OP_RETRACT) for op, _ in ops):
        raise InputError("unknown op", "ops are 'add' or 'retract'")
    parents = tuple(ids[p] for p in rec["parents"])
    commit = Commit(parents=parents, ops=tuple(Op(op, f.id) for op, f in ops), message=rec["message"],
                    author=rec["author"], timestamp=rec["timestamp"], meta=rec.get("meta") or {})
    return commit, ops


def write(store: Store, out_dir: str | Path, model: str) -> dict:
    """Write the history as text: `commits.jsonl` and `refs.json` (see the module doc)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = store.commit_order()
    ids = sorted(order, key=order.get)
    commits = store.commits(ids)
    facts = store.facts(o.fact_id for c in commits.values() for o in c.ops)
    with open(out / "commits.jsonl", "w", encoding="utf-8") as fh:
        for cid in ids:
            c = commits[cid]
            rec = {"id": cid, "parents": list(c.parents), "message": c.message, "author": c.author,
                   "timestamp": c.timestamp, "meta": c.meta,
                   "ops": [{"op": o.op, "fact": facts[o.fact_id].to_dict()} for o in c.ops]}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    refs = {"model": model, "head": store.head(), "branches": store.refs(), "relations": store.relations(),
            "decisions": [{"conflict": k, "created": c, **b} for k, b, c in store.resolutions()]}
    thr = store.meta("soft_threshold")
    if thr is not None:
        refs["soft_threshold"] = thr
    (out / "refs.json").write_text(json.dumps(refs, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"commits": len(ids), "facts": len(facts), "path": str(out)}


def restore_refs(store: Store, plan: TextLedger, final: dict[str, str], has_model: bool) -> None:
    """Branches, HEAD, relations, remembered decisions and the soft threshold of `plan`, with
    commit ids mapped through `final` (text id → id in the new ledger); in the caller's transaction."""
    refs = plan.refs
    for name, cid in (refs.get("branches") or {}).items():
        store.set_ref(check_branch_name(name), final[cid])
    store.set_head(plan.head if plan.head.startswith("ref: ") else final[plan.head])
    for key, rel in (refs.get("relations") or {}).items():
        store.set_relation(key, bool(rel.get("multi")), rel.get("inverse_of"))
    for d in refs.get("decisions") or []:  # remembered decisions (rerere) travel too
        body = {k: v for k, v in d.items() if k not in ("conflict", "created")}
        store.put_resolution(d["conflict"], body, d.get("created") or body.get("at") or "")
    if refs.get("soft_threshold") is not None and has_model:
        store.set_meta("soft_threshold", str(refs["soft_threshold"]))


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
    _check_threshold(refs.get("soft_threshold"), bad)


def _check_threshold(thr: object, bad) -> None:
    if thr is None or thr == "off":
        return
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
