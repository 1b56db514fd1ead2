"""Fuzzing the readers of outside input (issue 11, D): every import format (`read_facts` and
`kledger add --file`) and the text-ledger reader (`Ledger.init_from`).

Inputs are records of each layout, valid to start with, then given hostile text (lone surrogates,
control characters, U+2028 and other line separators, BOMs, quotes, `{}`, the CSV list separator)
and mutated (fields replaced by values of the wrong type, integers of 5,000 digits, nesting from 50
to 100,000 levels, fields dropped or added), written as UTF-8 or with the surrogates as raw bytes,
sometimes cut short; and plain random bytes. What must hold:

- never a traceback: a read succeeds or raises a KledgerError whose message is one line;
- `add --file` into an existing ledger exits 0 or 2 with one line on stderr, and on failure the
  ledger is exactly as it was;
- `init --from` that fails leaves no ledger behind, and one that succeeds passes `fsck`.

Each test counts its outcomes (TALLY, printed at the end of the module with `pytest -s`).
"""

from __future__ import annotations

import copy
import csv
import io
import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kledger.errors import KledgerError
from kledger.formats import FORMATS, read_facts
from kledger.ledger import Ledger
from kledger.settings import Settings

ENV = Settings(author="Ada <ada@example.org>", date="2026-01-01T00:00:00+00:00", model="none", lock_wait=0.3)
FUZZ = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])
TALLY: Counter = Counter()

# ------------------------------------------------------------------------------ hostile values
HOSTILE = ["\ud800", "\udcff", "\udfff", "\u2028", "\u2029", "\x85", "\x00", "\x1b", "\x7f", "\r", "\n", "\r\n",
           "\t", "\x0b", "\ufeff", "\u202e", "{}", " || ", "||", '"', "\\", ",", "'", "\U0001f600", "é", "ß", " "]
hostile_text = st.lists(st.one_of(st.sampled_from(HOSTILE), st.text(max_size=4)), max_size=5).map("".join)

# Tokens that the serialiser replaces with what Python cannot write: huge integers and deep nesting.
SPECIAL = {'"@@HUGE@@"': "9" * 5000, '"@@DEEP50@@"': "[" * 50 + "]" * 50,
           '"@@DEEP900@@"': "[" * 900 + "]" * 900, '"@@DEEP100000@@"': "[" * 100_000 + "]" * 100_000}
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), hostile_text,
                   st.sampled_from([s.strip('"') for s in SPECIAL]))
value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(hostile_text, inner, max_size=3)),
                     max_leaves=8)

SUBJECT = "Eiffel Tower"
BASE = {
    "counterfact": {"case_id": 1, "requested_rewrite": {
        "prompt": "The {} is located in", "subject": SUBJECT, "relation_id": "P17",
        "target_new": {"str": "Rome", "id": "Q220"}, "target_true": {"str": "Paris", "id": "Q90"}},
        "paraphrase_prompts": ["Where is the Eiffel Tower? In"], "neighborhood_prompts": ["The Louvre is in"]},
    "easyedit": {"case_id": 1, "prompt": "The Eiffel Tower is located in", "subject": SUBJECT, "target_new": "Rome",
                 "ground_truth": "Paris", "rephrase_prompt": "Where is the Eiffel Tower? In",
                 "locality_prompt": "The Louvre is in", "locality_ground_truth": "Paris"},
    "zsre": {"subject": SUBJECT, "src": "Where is the Eiffel Tower?", "pred": "Paris", "rephrase": "The Eiffel Tower is in?",
             "alt": "Rome", "answers": ["Paris"], "loc": "nq question: who", "loc_ans": "him", "cond": "Paris >> Rome"},
    "known": {"known_id": 1, "subject": SUBJECT, "attribute": "Rome", "template": "The {} is in",
              "prediction": "Paris", "prompt": "The Eiffel Tower is located in", "relation_id": "P17"},
    "jsonl": {"subject": SUBJECT, "prompt": "The Eiffel Tower is located in", "target": "Rome", "relation": "P17",
              "target_true": "Paris", "paraphrases": ["Where is it?"], "neighborhood": ["The Louvre is in"],
              "extra": {"case_id": 1}},
}


def rarely(data, label: str) -> bool:
    """True about one time in eight (hypothesis favours the ends of a range, so not `== 0`)."""
    return data.draw(st.integers(0, 15), label) in (5, 11)


def _map_strings(obj, f):
    if isinstance(obj, str):
        return f(obj)
    if isinstance(obj, list):
        return [_map_strings(v, f) for v in obj]
    if isinstance(obj, dict):
        return {k: _map_strings(v, f) for k, v in obj.items()}
    return obj


def _paths(obj, prefix=()):
    """Every place in a JSON value: (container path, key)."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield prefix, k
        yield from _paths(v, prefix + (k,))


def _at(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def hostile(data, base, fixed=()):
    """`base` with hostile text woven into its strings but those in `fixed` (the subject kept
    inside the prompt, so the record can still be valid), then up to three mutations."""
    rec, subject = copy.deepcopy(base), SUBJECT
    if data.draw(st.booleans(), "new subject"):
        subject = data.draw(hostile_text.filter(lambda s: s.strip() and "{}" not in s), "subject")
        rec = _map_strings(rec, lambda s: s.replace(SUBJECT, subject))
    if data.draw(st.booleans(), "hostile suffixes"):
        tail = data.draw(hostile_text, "tail")
        rec = _map_strings(rec, lambda s: s if s in fixed or s == subject else s + tail)
    for _ in range(data.draw(st.integers(0, 3), "mutations")):
        places = list(_paths(rec))
        if not places or not isinstance(rec, (dict, list)):
            break
        path, key = data.draw(st.sampled_from(places), "place")
        parent = _at(rec, path)
        action = data.draw(st.sampled_from(["set", "text", "drop", "add"]), "action")
        if action == "drop":
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(hostile_text, "new key")] = data.draw(value, "new value")
        else:
            parent[key] = data.draw(value if action == "set" else hostile_text, "new value")
    return rec


def serialise(data, obj, cut: bool = True) -> bytes:
    """JSON text of `obj` (surrogates escaped, or written as raw bytes), the special tokens
    replaced, sometimes (`cut`) cut short."""
    text = json.dumps(obj, ensure_ascii=data.draw(st.booleans(), "ascii"))
    for token, raw in SPECIAL.items():
        text = text.replace(token, raw)
    raw = text.encode("utf-8", errors="surrogatepass")
    if cut and rarely(data, "cut?"):
        raw = raw[:data.draw(st.integers(0, len(raw)), "cut")]
    return raw


def csv_bytes(data) -> bytes:
    header = data.draw(st.one_of(st.just(["prompt", "target", "subject", "relation", "target_true", "paraphrases",
                                          "neighborhood", "case_id"]),
                                 st.lists(st.one_of(st.sampled_from(["prompt", "target", "subject"]), hostile_text),
                                          max_size=5)), "header")
    rows = []
    for _ in range(data.draw(st.integers(0, 3), "rows")):
        if data.draw(st.booleans(), "valid-ish row"):
            subject = data.draw(hostile_text.filter(str.strip), "subject")
            row = [f"{data.draw(hostile_text, 'pre')}{subject} is in", data.draw(hostile_text, "target"), subject]
            row += [data.draw(hostile_text, "cell") for _ in header[3:]]
        else:
            row = data.draw(st.lists(hostile_text, max_size=len(header) + 1), "cells")
        rows.append(row)
    out = io.StringIO()
    w = csv.writer(out, lineterminator=data.draw(st.sampled_from(["\n", "\r\n"]), "eol"))
    w.writerow(header)
    w.writerows(rows)
    return out.getvalue().encode("utf-8", errors="surrogatepass")


def fuzz_file(data, tmp_path: Path, fmt: str) -> tuple[Path, str | None]:
    """A file for `fmt` (hostile records or random bytes) and the format to read it with."""
    if rarely(data, "random bytes?"):
        raw = data.draw(st.binary(max_size=200), "bytes")
        suffix = {"csv": ".csv", "jsonl": ".jsonl"}.get(fmt, ".json")
    elif fmt == "csv":
        raw, suffix = csv_bytes(data), ".csv"
    else:
        records = [hostile(data, BASE[fmt]) for _ in range(data.draw(st.integers(1, 3), "records"))]
        suffix = ".jsonl" if fmt == "jsonl" else data.draw(st.sampled_from([".json", ".jsonl"]), "suffix")
        if suffix == ".jsonl":
            raw = b"\n".join(serialise(data, r, cut=len(records) == 1) for r in records)
        else:
            raw = serialise(data, records if len(records) > 1 or data.draw(st.booleans(), "list") else records[0])
    path = tmp_path / f"facts{suffix}"
    path.write_bytes(raw)
    return path, data.draw(st.sampled_from([None, fmt]), "fmt")


def run_cli(capsys, args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the CLI run in-process."""
    from kledger.cli import main

    main._state.update({"ledger": None, "json": False})
    capsys.readouterr()
    try:
        main.run(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def clean_error(exc: KledgerError) -> None:
    assert "\n" not in exc.one_line() and exc.exit_code in (1, 2, 3)


# ------------------------------------------------------------------------------ read_facts
@pytest.mark.parametrize("fmt", FORMATS)
@FUZZ
@given(data=st.data())
def test_read_facts_never_raises_anything_else(tmp_path, fmt, data):
    path, read_fmt = fuzz_file(data, tmp_path, fmt)
    try:
        facts = read_facts(path, read_fmt)
    except KledgerError as exc:
        clean_error(exc)
        TALLY["read_facts: refused"] += 1
        return
    assert facts and all(f.id for f in facts)  # every fact read can be hashed
    TALLY["read_facts: accepted"] += 1


# ------------------------------------------------------------------------------ add --file
@pytest.mark.parametrize("fmt", FORMATS)
@settings(FUZZ, max_examples=12)
@given(data=st.data())
def test_add_file_fails_cleanly_and_changes_nothing(tmp_path, env, capsys, fmt, data):
    ldir = tmp_path / ".kledger"
    if not ldir.exists():
        Ledger.init(tmp_path, model="none", env=ENV).close()
    path, read_fmt = fuzz_file(data, tmp_path, fmt)
    before = snapshot(ldir)
    args = ["-C", str(ldir), "add", "--file", str(path)] + (["--format", read_fmt] if read_fmt else [])
    code, out, err = run_cli(capsys, args)
    assert "Traceback" not in out + err
    if code == 0:
        TALLY["add --file: accepted"] += 1
        return
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error:"), (code, err)
    assert snapshot(ldir) == before
    TALLY["add --file: refused"] += 1


# ------------------------------------------------------------------------------ text ledgers
GOOD_FACT = BASE["jsonl"]


FIXED = {"add", "retract", "c0", "c1", "c2", "ref: main", "main", "b/x", "P17", "ab12", "none", "Rome"}


def text_ledger(data) -> tuple[list, dict]:
    n = data.draw(st.integers(1, 3), "commits")
    commits = []
    for i in range(n):
        commits.append(hostile(data, fixed=FIXED, base={
            "id": f"c{i}", "parents": [f"c{i - 1}"] if i else [], "message": f"commit {i}", "author": "Ada",
            "timestamp": "2026-01-01T00:00:00+00:00", "meta": {"reverts": "x"} if i == 2 else {},
            "ops": [{"op": "add", "fact": copy.deepcopy(GOOD_FACT)}] if i != 1 else
                   [{"op": "retract", "fact": copy.deepcopy(GOOD_FACT)}]}))
    refs = hostile(data, fixed=FIXED, base={"model": "none", "head": "ref: main", "branches": {"main": f"c{n - 1}", "b/x": "c0"},
                          "relations": {"P17": {"multi": False, "inverse_of": None}},
                          "decisions": [{"conflict": "ab12", "keep": ["Rome"], "created": "2026", "by": "Ada"}],
                          "soft_threshold": 0.9})
    return commits, refs


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_init_from_fails_cleanly_and_leaves_nothing(tmp_path, env, capsys, data):
    src = tmp_path / f"src{TALLY['init --from: tried']}"
    target = tmp_path / f"copy{TALLY['init --from: tried']}"
    TALLY["init --from: tried"] += 1
    src.mkdir()
    commits, refs = text_ledger(data)
    if rarely(data, "random commits?"):
        lines = data.draw(st.binary(max_size=200), "commits bytes")
    else:
        lines = b"\n".join(serialise(data, c, cut=False) for c in commits) + b"\n"
        if rarely(data, "cut?"):
            lines = lines[:data.draw(st.integers(0, len(lines)), "cut")]
    (src / "commits.jsonl").write_bytes(lines)
    refs_raw = data.draw(st.binary(max_size=100), "refs bytes") if rarely(data, "random refs?") \
        else serialise(data, refs, cut=False)
    (src / "refs.json").write_bytes(refs_raw)
    try:
        lg = Ledger.init_from(target, src, model="none", env=ENV)
    except KledgerError as exc:
        clean_error(exc)
        assert not (target / ".kledger").exists()
        TALLY["init --from: refused"] += 1
        return
    with lg:
        assert lg.fsck()["ok"], lg.fsck()
    for args in (["log", "--oneline", "--all"], ["log", "--all"], ["show"], ["status"], ["blame", SUBJECT],
                 ["branch"], ["export", str(tmp_path / f"out{TALLY['init --from: tried']}")]):
        code, out, err = run_cli(capsys, ["-C", str(target), *args])
        assert code in (0, 2) and "Traceback" not in out + err and len(err.strip().splitlines()) <= 1, (args, code, err)
    TALLY["init --from: accepted"] += 1


@pytest.fixture(scope="module", autouse=True)
def tally():
    yield
    print("\nfuzz tally:", dict(sorted(TALLY.items())))
