"""`kledger report`: what the page for auditors shows, gathered from the ledger (no torch, no
model): the commits with their graph lanes, each fact's history, open and decided conflicts with
the contradiction graph laid out, and `kledger eval` results along the history when given.
kledger.report_page turns it into one self-contained HTML file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from . import __version__
from .errors import InputError, UsageError
from .records import OP_ADD, normalize, relation_key

if TYPE_CHECKING:
    from .ledger import Ledger

MAX_GRAPH_GROUPS = 150  # contradiction groups drawn; the tables list them all


def collect(ledger: "Ledger", rev: str | None = None, all_refs: bool = False,
            evals: Iterable[Path] = (), now: str = "") -> dict[str, Any]:
    """The report's data: plain JSON-able values only."""
    docs = [_read_eval(Path(p)) for p in evals]  # bad files are refused before any work
    h = ledger.history
    head = ledger.head()
    target = h.resolve(rev) if (rev is not None or head is not None) else None
    entries = ledger.log(rev, all_refs=all_refs) if target is not None else []
    index = {e["id"]: i for i, e in enumerate(entries)}
    cols, edges = lanes(entries)
    commits = [{"id": e["id"], "parents": e["parents"], "author": e["author"], "date": e["timestamp"],
                "message": e["message"], "added": e["added"], "retracted": e["retracted"], "refs": e["refs"],
                "col": c, "resolved": len(e["meta"].get("resolved") or ())} for e, c in zip(entries, cols)]
    in_force = set(h.state(target)) if target is not None else set()
    facts = _fact_histories(ledger, index, in_force)
    open_ = ledger.conflicts(target)["conflicts"] if target is not None else []
    decided = _decided(entries)
    return {
        "kledger": __version__, "generated": now, "ledger": str(ledger.path), "model": ledger.model,
        "branch": ledger.current_branch(), "head": head, "revision": target, "all": all_refs,
        "commits": commits, "edges": edges, "lanes": max([0, *cols, *(e[2] for e in edges)]) + 1 if commits else 0,
        "facts": facts, "in_force": len(in_force),
        "conflicts": {"open": [_open_row(c) for c in open_], "decided": decided},
        "graph": conflict_graph(open_, decided, facts),
        "metrics": metric_points(docs, index),
    }


def write(ledger: "Ledger", out_file: Path, rev: str | None, all_refs: bool, evals: list[Path]) -> dict[str, Any]:
    """Collect, render and write the page (whole or not at all); what was written, counted."""
    from .report_page import render

    if rev is not None and all_refs:
        raise UsageError("give REV or --all, not both", "--all starts from every branch")
    if out_file.is_dir() or not out_file.parent.is_dir():
        raise InputError(f"cannot write the report to {out_file}: "
                         + ("it is a folder" if out_file.is_dir() else f"no folder {out_file.parent}"),
                         "give a file path in an existing folder, e.g. --html report.html")
    data = collect(ledger, rev, all_refs, evals, now=ledger.env.now())
    text = render(data)
    tmp = out_file.with_name(f".{out_file.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out_file)
    except OSError as exc:
        raise InputError(f"cannot write the report to {out_file}: {exc.strerror or type(exc).__name__}",
                         "give a file path in a folder you can write to") from None
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(out_file), "bytes": len(text.encode("utf-8")), "revision": data["revision"],
            "commits": len(data["commits"]), "facts": len(data["facts"]), "in_force": data["in_force"],
            "open_conflicts": len(data["conflicts"]["open"]), "decided_conflicts": len(data["conflicts"]["decided"]),
            "metric_points": len(data["metrics"]["points"])}


# ------------------------------------------------------------------ the commit graph
def lanes(entries: list[dict]) -> tuple[list[int], list[list[int]]]:
    """Columns for drawing the commit graph of `entries` (newest first): each commit's column, and
    each parent edge as [child row, parent row, lane]. A parent keeps the lane its first child
    reserved for it (so a line of descent runs straight down), lanes are reused once free and never
    shifted; an edge runs in its lane and bends into the parent's column only at the parent."""
    row = {e["id"]: i for i, e in enumerate(entries)}
    slots: list[str | None] = []
    cols: list[int] = []
    edges: list[list[int]] = []

    def free() -> int:
        if None in slots:
            return slots.index(None)
        slots.append(None)
        return len(slots) - 1

    for i, e in enumerate(entries):
        mine = [j for j, s in enumerate(slots) if s == e["id"]]
        col = mine[0] if mine else free()
        for j in mine:
            slots[j] = None
        cols.append(col)
        for k, p in enumerate(e["parents"]):
            if p not in row:
                continue
            held = [j for j, s in enumerate(slots) if s == p]
            lane = col if k == 0 and slots[col] is None else (held[0] if held else free())
            slots[lane] = p
            edges.append([i, row[p], lane])
    return cols, edges


# ------------------------------------------------------------------ facts
def _fact_histories(ledger: "Ledger", index: dict[str, int], in_force: set[str]) -> list[dict]:
    """Every fact an op of the listed commits touches, with its events oldest first: [commit row, op]."""
    events: dict[str, list[list]] = {}
    for fid, cid, op in ledger.store.ops_in(list(index)):
        events.setdefault(fid, []).append([index[cid], op])
    facts = ledger.store.facts(events)
    # a change: in one commit, a fact retracted and another added with the same subject and relation
    moved: dict[tuple, dict[str, list[str]]] = {}
    for fid, evs in events.items():
        for row, op in evs:
            moved.setdefault((row, facts[fid].key), {}).setdefault(op, []).append(facts[fid].target)
    rows = []
    for fid, evs in events.items():
        f = facts[fid]
        evs.sort(key=lambda ev: -ev[0])  # rows are newest first: the oldest event has the largest row
        for ev in evs:  # [row, op, the other side's objects when the commit changed the fact]
            other = moved[(ev[0], f.key)].get("retract" if ev[1] == OP_ADD else OP_ADD, [])
            ev.append([t for t in other if t != f.target])
        rows.append({"id": fid, "subject": f.subject, "relation": f.relation, "prompt": f.prompt,
                     "target": f.target, "target_true": f.target_true, "in_force": fid in in_force,
                     "events": evs})
    rows.sort(key=lambda r: (r["subject"].casefold(), r["relation"], r["target"].casefold(), r["id"]))
    return rows


# ------------------------------------------------------------------ conflicts
def _open_row(c: dict) -> dict:
    return {"conflict": c["conflict"], "kind": c["kind"], "subject": c["subject"], "relation": c["relation"],
            "objects": c["objects"], "fact_ids": c["fact_ids"], "edges": c["edges"],
            "facts": [{k: f.get(k) for k in ("fact_id", "prompt", "target", "commit", "author", "timestamp")}
                      for f in c.get("facts", [])]}


def _decided(entries: list[dict]) -> list[dict]:
    """The decisions recorded by the listed commits (`meta.resolved`), newest first."""
    out = []
    for e in entries:
        for r in e["meta"].get("resolved") or ():
            out.append({"commit": e["id"], "conflict": r.get("conflict"), "kind": r.get("kind"),
                        "subject": r.get("subject"), "relation": r.get("relation"),
                        "objects": r.get("objects") or [], "keep": r.get("keep") or [],
                        "dropped": r.get("dropped") or [], "by": r.get("decided_by"), "at": r.get("decided_at"),
                        "remembered": bool(r.get("remembered"))})
    return out


def conflict_graph(open_: list[dict], decided: list[dict], facts: list[dict]) -> dict[str, Any]:
    """Nodes (facts) and edges (contradictions) of open and decided conflicts, laid out without
    numpy: each group of facts that contradict one another on a circle, groups in rows."""
    import networkx as nx

    by_id = {f["id"]: f for f in facts}
    by_key: dict[tuple[str, str], list[dict]] = {}
    for f in facts:
        by_key.setdefault((normalize(f["subject"]), relation_key(f["relation"])), []).append(f)
    g = nx.Graph()
    for c in open_:
        for a, b, kind in c["edges"]:
            g.add_edge(a, b, kind=kind, state="open")
    for d in decided:
        kept = [f["id"] for f in by_key.get((d["subject"], d["relation"]), ()) if normalize(f["target"]) in d["keep"]]
        for a in d["dropped"]:
            for b in kept:
                if not g.has_edge(a, b):
                    g.add_edge(a, b, kind=d["kind"], state="decided")
    groups = sorted((sorted(c) for c in nx.connected_components(g)), key=lambda c: (-len(c), c))
    shown = groups[:MAX_GRAPH_GROUPS]
    pos = _layout(shown)
    nodes = [{"id": n, "x": pos[n][0], "y": pos[n][1], "label": _node_label(by_id.get(n)),
              "open": any(d["state"] == "open" for _, _, d in g.edges(n, data=True))} for grp in shown for n in grp]
    edges = [{"a": a, "b": b, "kind": d["kind"], "state": d["state"]} for a, b, d in g.edges(data=True) if a in pos and b in pos]
    return {"nodes": nodes, "edges": edges, "groups": len(groups), "shown": len(shown)}


def _layout(groups: list[list[str]], cell: float = 220.0, per_row: int = 4) -> dict[str, tuple[float, float]]:
    pos = {}
    for gi, grp in enumerate(groups):
        cx, cy = (gi % per_row + 0.5) * cell, (gi // per_row + 0.5) * cell
        r = 0.0 if len(grp) == 1 else cell * 0.32
        for k, n in enumerate(grp):
            a = 2 * math.pi * k / len(grp) - math.pi / 2
            pos[n] = (round(cx + r * math.cos(a), 1), round(cy + r * math.sin(a), 1))
    return pos


def _node_label(f: dict | None) -> str:
    return "(fact not in this history)" if f is None else f"{f['subject']} · {f['relation']} → {f['target']}"


# ------------------------------------------------------------------ eval results
def _read_eval(path: Path) -> dict:
    hint = "give the output of `kledger eval --json > FILE` (with --plot for the whole history)"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"cannot read eval results {path}: no such file", hint) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read eval results {path}: {type(exc).__name__}", hint) from None
    if not (isinstance(doc, dict) and doc.get("command") == "eval" and isinstance(doc.get("edited"), dict)
            and isinstance(doc.get("base"), dict) and isinstance(doc.get("revision"), str)):
        raise InputError(f"{path} is not a `kledger eval --json` document", hint)
    return doc


def metric_points(docs: list[dict], index: dict[str, int]) -> dict[str, Any]:
    """The eval metrics per commit of the report (oldest first), after the base model's point. A
    later document's point for the same commit replaces an earlier one's; the base point is that of
    the last document with a commit in this history (the base model scored on its records)."""
    base, at, skipped = None, {}, 0
    for doc in docs:
        points = doc.get("history") or [{"commit": None, "metrics": doc["base"]},
                                         {"commit": doc["revision"], "metrics": doc["edited"]}]
        points = [p for p in points if isinstance(p, dict) and isinstance(p.get("metrics"), dict)]
        mine = {p["commit"]: p["metrics"] for p in points if p.get("commit") in index}
        skipped += sum(1 for p in points if p.get("commit") is not None and p["commit"] not in index)
        if mine:
            at.update(mine)
            base = next((p["metrics"] for p in points if p.get("commit") is None), base)
    order = sorted(at, key=lambda c: -index[c])
    points = ([{"commit": None, "label": "base", "metrics": base}] if base is not None else [])
    points += [{"commit": c, "label": c[:7], "metrics": at[c]} for c in order]
    return {"points": points, "series": series(points), "skipped": skipped}


def series(points: list[dict]) -> list[dict]:
    """Plottable series: the summary rates of each record kind (0–1), then perplexity and fluency."""
    from .edit.evaluate import GROUP_METRICS, KIND_TITLES

    out = []
    for kind, names in GROUP_METRICS.items():
        for name in names:
            ys = [_num((p["metrics"].get(kind) or {}).get(name)) for p in points]
            if any(y is not None for y in ys):
                out.append({"name": f"{KIND_TITLES[kind]} {name}", "unit": "rate", "ys": ys})
    for name in ("perplexity", "fluency"):
        ys = [_num(p["metrics"].get(name)) for p in points]
        if any(y is not None for y in ys):
            out.append({"name": name, "unit": name, "ys": ys})
    return out


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None
