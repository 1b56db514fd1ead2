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
from typing import Any

from .errors import InputError, KledgerError
from .history import check_branch_name
from .records import OP_ADD, OP_RETRACT, Commit, Fact, Op, check_json, check_text, json_kind, parse_json
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
    refs = _read_json(refs_file)
    plan = TextLedger()
    for n, rec in records:
        try:
            text_id, commit, ops = _commit(rec, plan.ids, n)
        except KledgerError as exc:
            raise InputError(f"{commits_file}:{n}: {exc.message}", exc.hint) from exc
        plan.ids[text_id] = commit.id
        plan.commits.append((commit, ops))
    _check_refs(refs, plan.ids, refs_file)
    plan.refs = refs
    return plan


_LINE_HINT = "each line is a commit: id, parents, message, author, timestamp, meta, ops (see docs/formats.md)"


def _field(rec: dict, key: str, kind: type, words: str, default: Any = KeyError) -> Any:
    """rec[key], which must be a `kind`; `default` when it is missing or null (required without one)."""
    value = rec.get(key)
    if value is None and default is not KeyError:
        return default
    if key not in rec:
        raise InputError(f"missing field {key!r}", _LINE_HINT)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InputError(f"{key!r} must be {words}, got {json_kind(value)}", _LINE_HINT)
    return value


def _commit(rec: Any, ids: dict[str, str], n: int) -> tuple[str, Commit, list[tuple[str, Fact]]]:
    """(the text's id, the commit with parents mapped through `ids`, its (op, fact) pairs) of one
    line, every field's type checked."""
    if not isinstance(rec, dict):
        raise InputError(f"expected a JSON object, got {json_kind(rec)}", _LINE_HINT)
    text_id = check_text(_field(rec, "id", str, "a string", str(n)), "'id'")
    parents = _field(rec, "parents", list, "a list of commit ids")
    for p in parents:
        if not isinstance(p, str) or p not in ids:
            raise InputError(f"parent {p!r} is not the id of a commit on an earlier line",
                             "parents come before their children in commits.jsonl")
    message, author, timestamp = (check_text(_field(rec, key, str, "a string"), repr(key))
                                  for key in ("message", "author", "timestamp"))
    if not message.strip():
        raise InputError("'message' is empty", "every commit has a message: write one")
    meta = check_json(_field(rec, "meta", dict, "an object", {}), "'meta'")
    ops = [_op(o, i) for i, o in enumerate(_field(rec, "ops", list, "a list of ops"), 1)]
    commit = Commit(parents=tuple(ids[p] for p in parents), ops=tuple(Op(op, f.id) for op, f in ops),
                    message=message, author=author, timestamp=timestamp, meta=meta)
    return text_id, commit, ops


def _op(o: Any, i: int) -> tuple[str, Fact]:
    if not isinstance(o, dict):
        raise InputError(f"op {i} must be an object with 'op' and 'fact', got {json_kind(o)}", _LINE_HINT)
    if o.get("op") not in (OP_ADD, OP_RETRACT):
        raise InputError(f"op {i}: unknown op {o.get('op')!r}", "ops are 'add' or 'retract'")
    d = o.get("fact")
    if not isinstance(d, dict):
        raise InputError(f"op {i}: 'fact' must be an object, got {json_kind(d)}", _LINE_HINT)
    try:
        return o["op"], Fact.create(prompt=d.get("prompt"), target=d.get("target"), subject=d.get("subject"),
                                    relation=d.get("relation"), target_true=d.get("target_true"),
                                    paraphrases=d.get("paraphrases"), neighborhood=d.get("neighborhood"),
                                    extra=d.get("extra"))
    except InputError as exc:
        raise InputError(f"op {i}: {exc.message}", exc.hint) from None


def write(store: Store, out_dir: str | Path, model: str) -> dict:
    """Write the history as text: `commits.jsonl` and `refs.json` (see the module doc)."""
    out = _export_dir(Path(out_dir), store.path)
    order = store.commit_order()
    ids = sorted(order, key=order.get)
    commits = store.commits(ids)
    facts = store.facts(o.fact_id for c in commits.values() for o in c.ops)
    lines = []
    for cid in ids:
        c = commits[cid]
        rec = {"id": cid, "parents": list(c.parents), "message": c.message, "author": c.author,
               "timestamp": c.timestamp, "meta": c.meta,
               "ops": [{"op": o.op, "fact": facts[o.fact_id].to_dict()} for o in c.ops]}
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    refs = {"model": model, "head": store.head(), "branches": store.refs(), "relations": store.relations(),
            "decisions": [{"conflict": k, "created": c, **b} for k, b, c in store.resolutions()]}
    thr = store.meta("soft_threshold")
    if thr is not None:
        refs["soft_threshold"] = thr
    for name, text in (("commits.jsonl", "".join(lines)), ("refs.json", json.dumps(refs, indent=2, ensure_ascii=False) + "\n")):
        try:
            (out / name).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot write {out / name}: {exc.strerror}",
                             "check that the directory is writable and has room") from None
    return {"commits": len(ids), "facts": len(facts), "path": str(out)}


def _export_dir(out: Path, ledger_dir: Path) -> Path:
    """`out`, made if need be, after refusing a target that is not a directory (a file,
    /dev/null) or lies inside the ledger's own directory."""
    hint = "give a new directory, or one to overwrite commits.jsonl and refs.json in, e.g. ledgers/NAME"
    if out.exists() and not out.is_dir():
        raise InputError(f"cannot export to {out}: it exists and is not a directory", hint)
    if out.resolve().is_relative_to(ledger_dir.resolve()):
        raise InputError(f"cannot export into the ledger's own directory {ledger_dir}",
                         "give a directory outside it, e.g. ledgers/NAME")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {out}: {exc.strerror}", hint) from None
    return out


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
        _branch_name(name, bad)
        if not isinstance(cid, str) or cid not in mapped:
            raise bad(f"branch {name!r} points at {str(cid)[:12]!r}, which is not in commits.jsonl")
    head = refs.get("head") or f"ref: {DEFAULT_BRANCH}"
    if not isinstance(head, str) or not (head.startswith("ref: ") or head in mapped):
        raise bad(f"'head' must be 'ref: BRANCH' or a commit id in commits.jsonl, got {head!r}")
    if head.startswith("ref: "):
        _branch_name(head[5:], bad)
    if not isinstance(refs.get("model") or "", str):
        raise bad(f"'model' must be a string, got {json_kind(refs['model'])}")
    _check_relations(refs.get("relations") or {}, bad)
    decisions = refs.get("decisions") or []
    if not isinstance(decisions, list) or not all(
            isinstance(d, dict) and isinstance(d.get("conflict"), str) and isinstance(d.get("keep"), list)
            and isinstance(d.get("created") or "", str) for d in decisions):
        raise bad("'decisions' must be a list of objects with 'conflict' and 'keep'")
    _check_threshold(refs.get("soft_threshold"), bad)
    try:
        check_json(refs, "refs.json")
    except InputError as exc:
        raise bad(exc.message.removeprefix("refs.json ")) from None


def _branch_name(name: str, bad) -> None:
    try:
        check_branch_name(name)
    except KledgerError as exc:
        raise bad(f"{exc.message} ({exc.hint})") from None


def _check_relations(relations: object, bad) -> None:
    if not isinstance(relations, dict) or not all(
            isinstance(rel, dict) and isinstance(rel.get("multi", False), (bool, type(None)))
            and isinstance(rel.get("inverse_of"), (str, type(None))) for rel in relations.values()):
        raise bad("'relations' must map relation keys to {\"multi\": true/false, \"inverse_of\": KEY or null}")


def _check_threshold(thr: object, bad) -> None:
    if thr is None or thr == "off":
        return
    try:
        ok = not isinstance(thr, bool) and 0 < float(thr) <= 1
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise bad(f"'soft_threshold' must be a cosine in (0, 1] or 'off', got {thr!r}")


def _read_json(path: Path) -> Any:
    try:
        return parse_json(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text", "save the file as UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: malformed JSON ({exc})", "fix or re-export the file") from exc
    except InputError as exc:
        raise InputError(f"{path}: {exc.message}", exc.hint) from None


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """(line number, record) of each non-blank line. Lines end at "\\n" only: JSON strings may
    hold U+2028, U+0085 and the other characters `str.splitlines` would also split at."""
    out = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text", "save the file as UTF-8") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((n, parse_json(line)))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{n}: malformed JSON ({exc.msg} at column {exc.colno})",
                             "fix that line or re-export the ledger") from exc
        except InputError as exc:
            raise InputError(f"{path}:{n}: {exc.message}", exc.hint) from None
    return out
