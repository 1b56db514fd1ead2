"""kledger.formats: round trips, the real shared data files, and one test per kind of bad input."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kledger.errors import InputError
from kledger.formats import FORMATS, read_facts, write_facts
from kledger.records import Fact

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

FACTS = [
    Fact.create("The Eiffel Tower is located in", "Rome", "The Eiffel Tower", relation="P17",
                target_true="Paris",
                paraphrases=["Where is the Eiffel Tower? It is in", "The Eiffel Tower, in"],
                neighborhood=["The Louvre is located in"], extra={"case_id": 7, "target_new_id": "Q220"}),
    Fact.create("Toko Yasuda, the", "piano", "Toko Yasuda", target_true="guitar",
                paraphrases=["Toko Yasuda is incredible at"], neighborhood=["John Lennon performs on the"]),
    Fact.create("What is the capital of Zürich, \"the city\"?", "Bern, Switzerland", "Zürich",
                relation="{}'s capital is"),  # a custom template, commas and quotes, no target_true
]


def _carried(fmt: str, fact: Fact) -> Fact:
    """The fact as `fmt` can carry it."""
    if fmt != "known":
        return fact
    return dataclasses.replace(fact, target_true=None, paraphrases=(), neighborhood=())


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(tmp_path, fmt, suffix):
    if fmt == "csv":
        suffix = ".csv"
    path = tmp_path / f"facts{suffix}"
    assert write_facts(path, FACTS, fmt) == len(FACTS)
    for read_fmt in (None, fmt):  # detected and explicit
        back = read_facts(path, read_fmt)
        assert back == [_carried(fmt, f) for f in FACTS]
    if fmt != "csv":
        assert back[0].extra["case_id"] == 7  # extra survives as top-level fields
    if fmt in ("counterfact", "jsonl"):
        assert back[0].extra["target_new_id"] == "Q220"


def test_counterfact_layout_is_romes(tmp_path):
    path = tmp_path / "cf.json"
    write_facts(path, FACTS[:1], "counterfact")
    rec = json.loads(path.read_text())[0]
    assert rec["requested_rewrite"] == {"prompt": "{} is located in", "relation_id": "P17",
                                        "target_new": {"str": "Rome", "id": "Q220"},
                                        "target_true": {"str": "Paris"}, "subject": "The Eiffel Tower"}
    assert rec["case_id"] == 7 and "target_new_id" not in rec


def test_csv_extra_columns_and_limit(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text("prompt,target,subject,source\nParis is in,Italy,Paris,me\nRome is in,Spain,Rome,you\n")
    facts = read_facts(path, limit=1)
    assert len(facts) == 1 and facts[0].extra == {"source": "me"} and facts[0].relation == "{} is in"


def test_json_object_holding_a_list(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"data": [{"prompt": "Paris is in", "target": "Italy", "subject": "Paris"}]}))
    assert read_facts(path)[0].target == "Italy"


def test_jsonl_mixed_layouts(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        FACTS[0].to_dict(),
        {"subject": "UniFirst", "src": "What does UniFirst make?", "alt": "drones", "answers": ["uniform"]},
        {"known_id": 1, "subject": "Beats Music", "attribute": "Apple", "prompt": "Beats Music is owned by",
         "relation_id": "P127"},
    ]) + "\n\n")
    a, b, c = read_facts(path)
    assert a == FACTS[0] and (b.target, b.target_true) == ("drones", "uniform") and c.relation == "P127"


# ---- the real shared data files ----

def test_real_counterfact():
    facts = read_facts(DATA / "counterfact-train.json", limit=300)
    assert len(facts) == 300
    f = facts[0]
    assert (f.subject, f.prompt, f.target, f.target_true) == (
        "Toko Yasuda", "Toko Yasuda, the", "piano", "guitar")
    assert f.relation == "{}, the"
    assert f.paraphrases == ("Toko Yasuda is incredible at",)
    assert f.neighborhood == ("John Lennon performs on the",)
    assert f.extra == {"case_id": 2, "locality_ground_truth": "guitar"}


def test_real_zsre():
    facts = read_facts(DATA / "zsre-train-1k.json", limit=300)
    f = facts[0]
    assert (f.subject, f.prompt, f.target, f.target_true) == (
        "UniFirst", "What is the product made by UniFirst?", "unmanned aircraft", "uniform")
    assert f.paraphrases == ("What will be the product of UniFirst?",)
    assert f.neighborhood == ("nq question: john goodman's character in the big lebowski",)
    assert f.extra["loc_ans"] == "Walter Sobchak" and f.extra["pred"] == "uniform"


def test_real_zsre_empty_alt_is_refused_not_skipped():
    # records 535 and 724 of the shared file have alt == "": no new answer, so no edit
    with pytest.raises(InputError) as e:
        read_facts(DATA / "zsre-train-1k.json")
    assert "record 535 (index 534)" in str(e.value) and "empty target" in str(e.value)


def test_real_known():
    facts = read_facts(DATA / "known-facts-1k.json", limit=300)
    f = facts[0]
    assert (f.subject, f.prompt, f.target, f.relation) == (
        "Vinson Massif", "Vinson Massif is located in the continent of", "Antarctica", "P30")
    assert f.extra["template"] == "{} is located in the continent" and f.extra["known_id"] == 0


def test_real_files_round_trip_in_their_own_layout(tmp_path):
    for name, fmt in (("counterfact-train.json", "easyedit"), ("zsre-train-1k.json", "zsre"),
                      ("known-facts-1k.json", "known")):
        facts = read_facts(DATA / name, limit=200)
        write_facts(tmp_path / name, facts, fmt)
        original = json.loads((DATA / name).read_text())[:200]
        written = json.loads((tmp_path / name).read_text())
        assert read_facts(tmp_path / name) == facts
        assert set(written[0]) == set(original[0])  # the same layout, with nothing added


def test_does_not_import_torch():
    code = "import sys, kledger.formats; assert not {'torch', 'transformers'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# ---- bad input: an InputError with a one-line message naming file, place and problem ----

GOOD = {"prompt": "Paris is in", "target": "Italy", "subject": "Paris"}
ROME = {"case_id": 0, "requested_rewrite": {"prompt": "{} is in", "subject": "Paris", "relation_id": "P17",
                                            "target_new": {"str": "Italy"}, "target_true": {"str": "France"}}}

BAD = {
    "malformed JSON": ("f.json", '[{"prompt": "a" "target": "b"}]', None, ["f.json:1:17", "malformed JSON"]),
    "truncated JSON": ("f.json", json.dumps([GOOD, GOOD], indent=1)[:60], None, ["truncated"]),
    "truncated at a bracket": ("f.json", json.dumps([GOOD, GOOD])[:-1], None, ["f.json:1:", "truncated"]),
    "truncated string": ("f.json", '[{"prompt": "Paris is', None, ["f.json:1:13", "truncated"]),
    "truncated JSONL": ("f.jsonl", json.dumps(GOOD) + "\n" + json.dumps(GOOD)[:20], None,
                        ["f.jsonl:2:", "truncated"]),
    "malformed JSONL": ("f.jsonl", json.dumps(GOOD) + "\n{oops}\n" + json.dumps(GOOD), None,
                        ["f.jsonl:2:2", "malformed JSON"]),
    "missing field": ("f.json", json.dumps([GOOD, {"prompt": "Rome is in", "subject": "Rome"}]), None,
                      ["record 2 (index 1)", "missing field 'target'"]),
    "missing nested field": ("f.json", json.dumps([{**ROME, "requested_rewrite": {"prompt": "{} is in"}}]),
                             None,
                             ["record 1", "'requested_rewrite.subject'"]),
    "missing field, forced layout": ("f.json", json.dumps([GOOD]), "zsre",
                                     ["record 1", "missing field 'src'"]),
    "wrong type": ("f.json", json.dumps([{**GOOD, "subject": 5}]), None,
                   ["record 1", "'subject' must be a string, got a number"]),
    "wrong list item type": ("f.jsonl", json.dumps({**GOOD, "paraphrases": ["ok", 3]}), None,
                             ["line 1", "'paraphrases[2]' must be a string"]),
    "record not an object": ("f.json", "[1]", None, ["record 1", "expected a JSON object, got a number"]),
    "top level not a list": ("f.json", '"facts"', None, ["expected a JSON list of records"]),
    "unknown layout": ("f.json", json.dumps([{"question": "q"}]), None,
                       ["record 1", "no known layout", "question"]),
    "subject not in prompt": ("f.json", json.dumps([GOOD, {**GOOD, "subject": "paris"}]), None,
                              ["record 2", "subject 'paris' does not occur in prompt"]),
    "empty target": ("f.json", json.dumps([{"subject": "X", "src": "Who is X?", "alt": "", "answers": []}]),
                     None, ["record 1", "empty target"]),
    "template without slot": ("f.json", json.dumps([{**ROME, "requested_rewrite": {
        **ROME["requested_rewrite"], "prompt": "Paris is in"}}]), None, ["record 1", "no '{}' slot"]),
    "empty file": ("f.json", "  \n", None, ["f.json", "empty"]),
    "empty list": ("f.json", "[]", None, ["f.json", "no records"]),
    "unknown extension": ("f.txt", json.dumps([GOOD]), None, ["f.txt", "cannot tell the format", ".txt"]),
    "csv missing columns": ("f.csv", "prompt,object\nParis is in,Italy\n", None,
                            ["f.csv", "lacks required column(s) target, subject"]),
    "csv wrong field count": ("f.csv", "prompt,target,subject\nParis is in,Italy,Paris\nRome is in,Spain\n",
                              None, ["f.csv", "line 3", "row has 2 fields, the header has 3"]),
    "csv unterminated quote": ("f.csv", 'prompt,target,subject\nParis is in,"Italy,Paris\n', None,
                               ["f.csv", "malformed CSV"]),
    "csv subject not in prompt": ("f.csv", "prompt,target,subject\nParis is in,Italy,Rome\n", None,
                                  ["f.csv", "line 2", "does not occur in prompt"]),
    "not UTF-8": ("f.json", b'[{"prompt": "Caf\xe9 is in"}]', None, ["f.json", "line 1", "not UTF-8"]),
    "unknown format": ("f.json", json.dumps([GOOD]), "rome", ["unknown format 'rome'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(tmp_path, case):
    name, content, fmt, expected = BAD[case]
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with pytest.raises(InputError) as e:
        read_facts(path, fmt)
    _assert_one_line(e.value, expected)


def _assert_one_line(err: InputError, expected: list[str]) -> None:
    text = err.one_line()
    assert "\n" not in str(err) and "\n" not in text and err.hint
    for part in expected:
        assert part in text, (part, text)


def test_missing_file(tmp_path):
    with pytest.raises(InputError) as e:
        read_facts(tmp_path / "nope.json")
    _assert_one_line(e.value, ["nope.json", "no such file"])


def test_directory(tmp_path):
    with pytest.raises(InputError) as e:
        read_facts(tmp_path, "jsonl")
    _assert_one_line(e.value, ["is a directory"])


def test_limit_reads_only_the_first_records(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{broken\n")
    assert len(read_facts(path, limit=1)) == 1
    with pytest.raises(InputError) as e:
        read_facts(path, limit=2)
    _assert_one_line(e.value, ["f.jsonl:2:"])
    with pytest.raises(InputError):
        read_facts(path, limit=0)


def test_write_errors(tmp_path):
    with pytest.raises(InputError) as e:
        write_facts(tmp_path / "no" / "such" / "dir.json", FACTS, "easyedit")
    _assert_one_line(e.value, ["cannot write"])
    with pytest.raises(InputError) as e:
        write_facts(tmp_path / "f.json", FACTS, "rome")
    _assert_one_line(e.value, ["unknown format"])
    bad = Fact.create("Paris is in", "Italy", "Paris", paraphrases=["Paris || Rome"])
    with pytest.raises(InputError) as e:
        write_facts(tmp_path / "f.csv", [bad], "csv")
    _assert_one_line(e.value, ["fact 1", "'||'"])
