"""Issue 11 ("Trust"): bad input and damaged ledgers give one-line errors, never tracebacks, and
leave the ledger as it was; inputs that used to be wrongly accepted are refused; `--json` output
is never broken by DuckDB's progress bar."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, snapshot

from kledger.errors import InputError
from kledger.ledger import Ledger
from kledger.records import Fact
from kledger.settings import Settings

ENV = Settings(author="Ada <ada@example.org>", date="2026-01-01T00:00:00+00:00", model="none", lock_wait=0.3)


def one_line_error(r, code: int = 2, *words: str) -> None:
    """`r` failed with `code`, said so on one line of stderr, and printed no traceback."""
    assert r.code == code, (r.code, r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.err
    assert "Traceback" not in r.err + r.out
    for w in words:
        assert w in r.err, (w, r.err)


# ------------------------------------------------------------------------------ C: progress bar
def test_progress_bar_is_off_on_every_connection(tmp_path):
    """DuckDB's Python client prints a progress bar on stdout for queries over 2 s, which would
    break `--json`: every connection the store makes turns it off. (DuckDB turns it on by default
    only in what it takes for an interactive session, such as `python -c`, so that is where this
    runs.)"""
    code = textwrap.dedent(f"""
        from pathlib import Path
        from kledger import store
        from kledger.store import Store
        SQL = "SELECT current_setting('enable_progress_bar')"
        d = Path({str(tmp_path)!r}) / ".kledger"
        seen = []
        with Store.create(d, {{}}) as st:
            seen.append(st.con.execute(SQL).fetchone()[0])
        for write in (False, True):
            with Store.open(d, write=write) as st:
                seen.append(st.con.execute(SQL).fetchone()[0])
        con = store._connect(d.parent / "other.duckdb")  # the one place connections are made (create's too)
        seen.append(con.execute(SQL).fetchone()[0])
        con.close()
        import duckdb
        print("DEFAULT", duckdb.connect(":memory:").execute(SQL).fetchone()[0], "SEEN", seen)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["DEFAULT", "True", "SEEN", "[False,", "False,", "False,", "False]"], r.stdout


# ------------------------------------------------------------------------------ helpers
EIFFEL = ("add", "The Eiffel Tower is located in", "Rome", "--subject", "Eiffel Tower")
GOOD_FACT = {"subject": "Eiffel Tower", "prompt": "The Eiffel Tower is located in", "target": "Rome"}


def good_commit(**fields) -> dict:
    rec = {"id": "c1", "parents": [], "message": "m", "author": "a", "timestamp": "2026-01-01T00:00:00+00:00",
           "meta": {}, "ops": [{"op": "add", "fact": dict(GOOD_FACT)}]}
    rec.update(fields)
    return rec


def text_ledger(d: Path, lines: list[str] | None = None, refs: str | None = None, **fields) -> Path:
    """A text ledger in `d`: one good commit (with `fields` replaced), or the raw `lines`."""
    d.mkdir(parents=True, exist_ok=True)
    if lines is None:
        lines = [json.dumps(good_commit(**fields))]  # a lone surrogate as a \\u escape
    (d / "commits.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    (d / "refs.json").write_text(refs if refs is not None else json.dumps({"head": "ref: main", "branches": {"main": "c1"}}),
                                 encoding="utf-8")
    return d


@pytest.fixture
def committed(k, tmp_path):
    """A facts-only ledger in tmp_path with one commit and one staged fact."""
    assert k("init").code == 0
    assert k(*EIFFEL).code == 0
    assert k("commit", "-m", "one").code == 0
    assert k("add", "The Louvre is located in", "London", "--subject", "Louvre").code == 0
    return tmp_path / ".kledger"


def refused_init_from(k, src: Path, tmp_path: Path, *words: str) -> None:
    """`init --from src` fails with exit 2 on one line and leaves no ledger behind."""
    target = tmp_path / "copy"
    one_line_error(k("init", target, "--from", src), 2, *words)
    assert not (target / ".kledger").exists()


def refused_add_file(k, ledger: Path, path: Path, *words: str) -> None:
    before = snapshot(ledger)
    one_line_error(k("add", "--file", path), 2, *words)
    assert snapshot(ledger) == before


# ------------------------------------------------------------------------------ A: surrogates, bytes
def test_lone_surrogates_on_the_command_line(k, committed):
    """Undecodable bytes in an argument reach Python as lone surrogates: refused as not UTF-8."""
    before = snapshot(committed)
    for args in (("add", "The \udcff Tower is in", "Rome", "--subject", "\udcff"),
                 ("commit", "-m", "msg \udcff"), ("rm", "\udcff"), ("log", "\udcff"), ("blame", "\udcff"),
                 ("branch", "b\udcff")):
        one_line_error(k(*args), 2, "UTF-8")
    assert snapshot(committed) == before


def test_lone_surrogates_in_files(k, committed, tmp_path):
    p = tmp_path / "s.json"
    p.write_text('[{"prompt": "The \\ud800 is in", "subject": "\\ud800", "target": "Rome"}]')
    refused_add_file(k, committed, p, "s.json", "record 1", "UTF-8")
    p = tmp_path / "s.jsonl"
    p.write_text('{"prompt": "A is in", "subject": "A", "target": "Rome", "extra": {"x": "\\udfff"}}')
    refused_add_file(k, committed, p, "line 1", "extra", "UTF-8")
    p = tmp_path / "b.csv"
    p.write_bytes(b"prompt,target,subject\nThe \xff is in,Rome,\xff\n")
    refused_add_file(k, committed, p, "not UTF-8")
    src = text_ledger(tmp_path / "t1", message="m \ud800")
    refused_init_from(k, src, tmp_path, "commits.jsonl:1", "message", "UTF-8")
    (tmp_path / "t2").mkdir()
    (tmp_path / "t2" / "commits.jsonl").write_bytes(b'{"id": "\xff"}\n')
    (tmp_path / "t2" / "refs.json").write_text("{}")
    refused_init_from(k, tmp_path / "t2", tmp_path, "UTF-8")
    src = text_ledger(tmp_path / "t3", refs='{"head": "ref: main", "branches": {"main": "c1"}, "model": "\\udc80"}')
    refused_init_from(k, src, tmp_path, "refs.json")


def test_surrogates_are_refused_by_the_library_too(tmp_path):
    with pytest.raises(InputError, match="UTF-8"):
        Fact.create("The \udcff Tower is in", "Rome", "\udcff")
    with pytest.raises(InputError, match="UTF-8"):
        Fact.create("The Tower is in", "Rome", "Tower", paraphrases=["\ud800"])
    lg = Ledger.init(tmp_path, model="none", env=ENV)
    lg.add([Fact.create("The Tower is in", "Rome", "Tower")])
    with pytest.raises(InputError, match="UTF-8"):
        lg.commit("m \ud800")
    with pytest.raises(InputError, match="UTF-8"):
        lg.commit("m", author="\ud800")
    assert lg.head() is None and len(lg.store.staged()) == 1
    lg.close()


# ------------------------------------------------------------------------------ A: deep nesting, huge numbers
DEEP = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_json(k, committed, tmp_path):
    for name, text in (("deep.json", DEEP), ("deep.jsonl", DEEP),
                       ("deep2.json", json.dumps([{**GOOD_FACT, "x": 1}]).replace("1", DEEP))):
        (tmp_path / name).write_text(text)
        refused_add_file(k, committed, tmp_path / name, name, "nested")
    # deep enough to parse, too deep to be an extra field kept with the fact
    nested = {**GOOD_FACT, "extra": {"x": json.loads("[" * 500 + "]" * 500)}}
    (tmp_path / "d.jsonl").write_text(json.dumps(nested))
    refused_add_file(k, committed, tmp_path / "d.jsonl", "extra", "nested")
    refused_init_from(k, text_ledger(tmp_path / "t1", lines=[DEEP]), tmp_path, "commits.jsonl", "nested")
    refused_init_from(k, text_ledger(tmp_path / "t2", refs=DEEP), tmp_path, "refs.json", "nested")
    refused_init_from(k, text_ledger(tmp_path / "t3", meta={"x": json.loads("[" * 500 + "]" * 500)}),
                      tmp_path, "commits.jsonl:1", "meta", "nested")
    deep_decision = {"conflict": "ab", "keep": [], "x": json.loads("[" * 500 + "]" * 500)}
    refs = json.dumps({"head": "ref: main", "branches": {"main": "c1"}, "decisions": [deep_decision]})
    refused_init_from(k, text_ledger(tmp_path / "t4", refs=refs), tmp_path, "refs.json", "nested")


HUGE = "9" * 5000


def test_integers_over_the_int_str_limit(k, committed, tmp_path):
    for name, text in (("big.json", '[{"prompt": "A is", "subject": "A", "target": "B", "n": %s}]' % HUGE),
                       ("big.jsonl", '{"prompt": "A is", "subject": "A", "target": "B", "n": %s}' % HUGE),
                       ("big2.json", '{"prompt": "A is", "subject": "A", "target": "B", "n": %s}\n{}' % HUGE)):
        (tmp_path / name).write_text(text)
        refused_add_file(k, committed, tmp_path / name, name, "digits")
    line = json.dumps(good_commit(meta={"n": 1})).replace('"n": 1', f'"n": {HUGE}')
    refused_init_from(k, text_ledger(tmp_path / "t1", lines=[line]), tmp_path, "commits.jsonl:1", "digits")
    refs = '{"head": "ref: main", "branches": {"main": "c1"}, "soft_threshold": %s}' % HUGE
    refused_init_from(k, text_ledger(tmp_path / "t2", refs=refs), tmp_path, "refs.json", "digits")


# ------------------------------------------------------------------------------ A: export targets
def test_export_to_a_file_or_dev_null_is_refused(k, committed, tmp_path):
    (tmp_path / "afile").write_text("keep me")
    before = snapshot(committed)
    one_line_error(k("export", tmp_path / "afile"), 2, "afile", "not a directory")
    assert (tmp_path / "afile").read_text() == "keep me"
    one_line_error(k("export", "/dev/null"), 2, "/dev/null", "not a directory")
    one_line_error(k("export", tmp_path / "afile" / "sub"), 2, "afile")
    assert snapshot(committed) == before


# ------------------------------------------------------------------------------ A/B: mistyped text-ledger fields
MISTYPED = {
    "extra a string": (dict(ops=[{"op": "add", "fact": {**GOOD_FACT, "extra": "abc"}}]), "'extra' must be an object"),
    "author null": (dict(author=None), "'author' must be a string"),
    "numeric timestamp": (dict(timestamp=1767225600), "'timestamp' must be a string"),
    "list message": (dict(message=["a", "b"]), "'message' must be a string"),
    "empty message": (dict(message=" \u2028 "), "'message' is empty"),
    "meta a string": (dict(meta="x"), "'meta' must be an object"),
    "parents a string": (dict(parents="c0"), "'parents' must be a list"),
    "unknown parent": (dict(parents=["nope"]), "parent 'nope'"),
    "ops an object": (dict(ops={"op": "add"}), "'ops' must be a list"),
    "op not an object": (dict(ops=["add"]), "op 1"),
    "fact a string": (dict(ops=[{"op": "add", "fact": "x"}]), "'fact' must be an object"),
    "relation a number": (dict(ops=[{"op": "add", "fact": {**GOOD_FACT, "relation": 5}}]), "'relation' must be a string"),
    "target_true a number": (dict(ops=[{"op": "add", "fact": {**GOOD_FACT, "target_true": 5}}]), "'target_true'"),
    "paraphrases a number": (dict(ops=[{"op": "add", "fact": {**GOOD_FACT, "paraphrases": 5}}]), "'paraphrases'"),
    "paraphrase not a string": (dict(ops=[{"op": "add", "fact": {**GOOD_FACT, "neighborhood": ["a", 3]}}]),
                                "'neighborhood'"),
    "id a list": (dict(id=["c1"]), "'id' must be a string"),
    "missing author": (dict(author=KeyError), "'author'"),
}


@pytest.mark.parametrize("case", sorted(MISTYPED))
def test_mistyped_text_ledger_fields_are_refused_before_anything_is_made(k, tmp_path, case):
    fields, words = MISTYPED[case]
    rec = good_commit(**fields)
    rec = {key: v for key, v in rec.items() if v is not KeyError}
    src = text_ledger(tmp_path / "t", lines=[json.dumps(rec)])
    refused_init_from(k, src, tmp_path, "commits.jsonl:1", words)


def test_a_line_that_is_not_an_object(k, tmp_path):
    refused_init_from(k, text_ledger(tmp_path / "t", lines=["[1, 2]"]), tmp_path, "commits.jsonl:1", "object")



# ------------------------------------------------------------------------------ B: wrongly accepted
def test_export_into_the_ledger_itself_is_refused(k, committed):
    before = snapshot(committed)
    for target in (committed, committed / "text", committed.parent / ".kledger" / "." / "x"):
        one_line_error(k("export", target), 2, "ledger's own directory")
    assert snapshot(committed) == before
    assert sorted(p.name for p in committed.iterdir()) == ["ledger.duckdb"]


def test_branch_names_are_capped(k, committed):
    before = snapshot(committed)
    one_line_error(k("branch", "a" * 5000), 2, "255")
    one_line_error(k("checkout", "-b", "b" * 256), 2, "255")
    assert snapshot(committed) == before
    assert k("branch", "c" * 255).code == 0


def test_text_ledger_head_must_name_a_valid_branch(k, tmp_path):
    for head in ("ref: bad..name", "ref: ", "ref: HEAD", "ref: " + "x" * 300):
        refs = json.dumps({"head": head, "branches": {"main": "c1"}})
        refused_init_from(k, text_ledger(tmp_path / "t", refs=refs), tmp_path, "refs.json", "branch name")


def test_a_lone_string_of_prompts_is_one_prompt(k, tmp_path):
    """`paraphrases` and `neighborhood` given as a string are one prompt (as the data formats'
    single-prompt fields are), not split into characters."""
    f = Fact.create("The Eiffel Tower is in", "Rome", "Eiffel Tower", paraphrases="Where is the Eiffel Tower?",
                    neighborhood="The Louvre is in")
    assert f.paraphrases == ("Where is the Eiffel Tower?",) and f.neighborhood == ("The Louvre is in",)
    src = text_ledger(tmp_path / "t", ops=[{"op": "add", "fact": {**GOOD_FACT, "paraphrases": "It is in"}}])
    assert k("init", tmp_path / "copy", "--from", src).code == 0
    shown = k("-C", tmp_path / "copy", "show", "--json").json
    assert shown["ops"][0]["paraphrases"] == ["It is in"]


LINE_BREAKS = "\u2028\u2029\u0085\x0b\x0c\x1c\x1d\x1e\r"


def test_line_separators_inside_facts_survive_export_and_init_from(k, committed, tmp_path):
    """JSON strings may hold characters `str.splitlines` splits at; a text ledger's lines end at
    "\\n" only, so such a fact survives `export` → `init --from`."""
    prompt = f"The{LINE_BREAKS}Tower is located in"
    assert k("add", prompt, "Rome", "--subject", f"The{LINE_BREAKS}Tower").code == 0
    assert k("commit", "-m", f"odd{LINE_BREAKS}message").code == 0
    assert k("export", tmp_path / "text").code == 0
    r = k("init", tmp_path / "copy", "--from", tmp_path / "text", "--json")
    assert r.code == 0, r.err
    assert k("-C", tmp_path / "copy", "log", "--json").json["commits"] == k("log", "--json").json["commits"]
    (tmp_path / "f.jsonl").write_text(json.dumps({**GOOD_FACT, "prompt": f"The Eiffel Tower{LINE_BREAKS}is in"},
                                                 ensure_ascii=False) + "\n", encoding="utf-8")
    assert k("add", "--file", tmp_path / "f.jsonl").code == 0


# ------------------------------------------------------------------------------ A: damaged stores
def damage(ledger: Path, *sql: str) -> None:
    import duckdb

    con = duckdb.connect(str(ledger / "ledger.duckdb"))
    for q in sql:
        con.execute(q)
    con.close()


READS = (("status",), ("log",), ("show",), ("diff", "HEAD", "HEAD"), ("blame", "Eiffel Tower"), ("status", "--json"),
         ("log", "--all"), ("export", "out"))


@pytest.mark.parametrize("sql", ["DELETE FROM facts", "DELETE FROM commits", "DELETE FROM commit_ops",
                                 "UPDATE refs SET commit_id = 'f00d' || commit_id"])
def test_missing_rows_are_integrity_errors(k, committed, sql):
    """A row the ledger refers to is gone: each read is one line pointing to fsck (exit 1), or
    works around the gap; never a KeyError."""
    damage(committed, sql)
    for args in READS:
        r = k(*args)
        if r.code != 0:
            one_line_error(r, 1, "damaged", "kledger fsck")
    assert k("fsck").code == 1


@pytest.mark.parametrize("table", ["commits", "facts", "refs", "staged", "commit_ops", "resolutions"])
def test_a_missing_table_is_a_schema_error(k, committed, table):
    damage(committed, f"DROP TABLE {table}")
    for args in (("status",), ("log",), ("fsck",), ("add", "A is in", "B", "--subject", "A")):
        one_line_error(k(*args), 1, "damaged", repr(table), "backup")


def test_a_missing_column_is_a_schema_error(k, committed):
    damage(committed, "ALTER TABLE commits DROP COLUMN author")
    one_line_error(k("log"), 1, "damaged", "commits.author")


@pytest.mark.parametrize("sql", ["DELETE FROM meta WHERE key = 'schema_version'",
                                 "UPDATE meta SET value = 'abc' WHERE key = 'schema_version'",
                                 "UPDATE meta SET value = '0' WHERE key = 'schema_version'",
                                 "UPDATE meta SET value = '-3' WHERE key = 'schema_version'"])
def test_a_bad_schema_version_is_a_schema_error(k, committed, sql):
    damage(committed, sql)
    for args in (("status",), ("reset",), ("fsck",)):
        one_line_error(k(*args), 1, "schema version", "backup")


# ------------------------------------------------------------------------------ A: the last line of defence
def test_an_unexpected_exception_is_still_one_line(k, committed, monkeypatch):
    def boom(self, *a, **kw):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(Ledger, "status", boom)
    one_line_error(k("status"), 1, "RuntimeError", "boom second line", "bug")
    r = k("status", "--json")
    assert r.code == 1 and json.loads(r.out)["error"]["kind"] == "internal"
    monkeypatch.setattr(Ledger, "log", lambda *a, **kw: json.loads("[" * 100_000))
    one_line_error(k("log"), 1, "RecursionError")


def test_init_set_values_python_cannot_read(k, tmp_path):
    for value in ("9" * 5000, "[" * 100_000, "9" * 4000, "1e999", "[" * 300 + "]" * 300):
        r = k("init", tmp_path / "l", "--set", f"lam={value}")
        one_line_error(r, 2, "lam")
        assert not (tmp_path / "l" / ".kledger").exists()


def test_a_revision_step_too_large_to_read(k, committed):
    for rev in ("HEAD~" + "9" * 5000, "HEAD^" + "9" * 5000, "HEAD~" + "9" * 30):
        one_line_error(k("show", rev), 2, "HEAD")
