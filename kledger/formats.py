"""Reading and writing facts in the common knowledge-editing data layouts. Pure stdlib.

Record layouts (with no `fmt`, each JSON record's layout is detected from its keys):

  counterfact  ROME's CounterFact: {case_id, requested_rewrite: {prompt: "{} is located in", subject,
               target_new: {str, id}, target_true: {str, id}, relation_id}, paraphrase_prompts,
               neighborhood_prompts, generation_prompts, ...}
  easyedit     EasyEdit's CounterFact: {case_id, prompt, subject, target_new, ground_truth,
               rephrase_prompt, locality_prompt, locality_ground_truth}
  zsre         MEND's ZsRE: {subject, src, pred, rephrase, alt, answers, loc, loc_ans, cond}
  known        ROME's known facts: {known_id, subject, attribute, template, prediction, prompt, relation_id}
  jsonl        kledger's own `Fact.to_dict()`, one JSON object a line (a line may use any layout above)
  csv          a header row naming prompt, target, subject (required) and relation, target_true,
               paraphrases, neighborhood (optional; the two lists joined by " || "); any other
               column goes to `extra`, as a string

Mapping: prompt = the filled-in template / `prompt` / `src`; target = target_new / `alt` /
`attribute`; target_true = target_true / `ground_truth` / answers[0]; relation = `relation_id` when
given, else the prompt template (`Fact.create`'s default); paraphrases = paraphrase_prompts /
rephrase_prompt / rephrase; neighborhood = neighborhood_prompts / locality_prompt / loc. Every other
field of a record goes to `extra` (ROME's target ids as `target_new_id`, `target_true_id`; ZsRE's
`answers` when there is more than one), and writers put `extra` back as top-level fields, so e.g.
`case_id` survives a round trip. Single-prompt fields (rephrase_prompt, rephrase, locality_prompt,
loc) are read as a string or a list, and written as a list only when a fact has several.

Containers: `.json` holds one JSON list of records (or an object holding one list, one record, or
JSON lines); `.jsonl`/`.ndjson` one record a line; `.csv` is CSV. With `fmt` set to a record layout,
a file with another extension is read as a JSON list when it starts with `[`, else as JSON lines.
Writers of the record layouts write a JSON list, or JSON lines when the path ends in `.jsonl` or
`.ndjson`; `jsonl` always writes JSON lines. The counterfact writer's prompt template is the prompt
with the subject replaced by `{}` (the fact's relation when that is the default template), and
`relation_id` is the fact's relation. `extra` fields named like another layout's identifying key
(requested_rewrite, src, attribute, target_new, target) are not written, so the record is read
back in the layout it was written in.

Errors: every problem raises `InputError` with a one-line message naming the file and the place
(`record N (index N-1)` in a JSON list, `line N` in JSON lines and CSV, `line:column` for JSON
syntax) and a hint. Record numbers are 1-based. No record is skipped: the first invalid one fails
the read. Of the shared data files, counterfact-train.json (10,000) and known-facts-1k.json (1,209)
are all valid; zsre-train-1k.json has 998 of 1,000 valid: records 535 and 724 have an empty `alt`
(no new answer, so no edit), and reading the whole file fails there. Read with `limit` or
remove those two records. Known-facts `template` often differs from its `prompt` ("... continent" vs
"... continent of"); the prompt is used and the template kept in `extra`.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import InputError
from .records import SUBJECT_SLOT, Fact, json_kind, parse_json, template_of

FORMATS = ("counterfact", "easyedit", "zsre", "known", "jsonl", "csv")
LIST_SEP = " || "
CSV_COLUMNS = ("prompt", "target", "subject", "relation", "target_true", "paraphrases", "neighborhood")
_CSV_REQUIRED = CSV_COLUMNS[:3]
_LINES_EXT = (".jsonl", ".ndjson")


class _Rec:
    """Typed access to one source record; each problem raises InputError naming the field.
    `rest()` returns the fields not read, for `extra`."""

    def __init__(self, data: dict, layout: str, prefix: str = ""):
        self.data, self.layout, self.prefix, self.used = data, layout, prefix, set()

    def _get(self, key: str, required: bool) -> Any:
        self.used.add(key)
        value = self.data.get(key)
        if value is None and required:
            raise InputError(f"missing field {self.prefix + key!r}",
                             f"a {self.layout} record needs {_LAYOUTS[self.layout].needs}")
        return value

    def _type_error(self, key: str, expected: str, got: Any) -> InputError:
        return InputError(f"field {self.prefix + key!r} must be {expected}, got {json_kind(got)}",
                          f"make {self.prefix + key!r} {expected}")

    def text(self, key: str, required: bool = False) -> str | None:
        value = self._get(key, required)
        if value is not None and not isinstance(value, str):
            raise self._type_error(key, "a string", value)
        return value

    def texts(self, key: str) -> list[str]:
        value = self._get(key, False)
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list):
            raise self._type_error(key, "a string or a list of strings", value)
        for j, item in enumerate(value, 1):
            if not isinstance(item, str):
                raise self._type_error(f"{key}[{j}]", "a string", item)
        return value

    def obj(self, key: str, required: bool = False) -> "_Rec":
        value = self._get(key, required)
        if value is not None and not isinstance(value, dict):
            raise self._type_error(key, "an object", value)
        return _Rec(value or {}, self.layout, f"{self.prefix}{key}.")

    def rest(self) -> dict:
        return {k: v for k, v in self.data.items() if k not in self.used}


# Readers take a record and return `Fact.create` keyword arguments. `extra=r.rest()` comes last:
# keyword arguments are evaluated in order, so every field read above it is excluded.

def _read_counterfact(r: _Rec) -> dict:
    rw = r.obj("requested_rewrite", True)
    template, subject = rw.text("prompt", True), rw.text("subject", True)
    if SUBJECT_SLOT not in template:
        raise InputError(f"requested_rewrite.prompt {template!r} has no '{{}}' slot for the subject",
                         "write the prompt as a template, e.g. '{} is located in'")
    new, true = rw.obj("target_new", True), rw.obj("target_true")
    ids = {f"{name}_id": t.data["id"] for name, t in (("target_new", new), ("target_true", true))
           if t.data.get("id") is not None}
    return dict(prompt=template.replace(SUBJECT_SLOT, subject, 1), subject=subject,
                target=new.text("str", True), target_true=true.text("str"), relation=rw.text("relation_id"),
                paraphrases=r.texts("paraphrase_prompts"), neighborhood=r.texts("neighborhood_prompts"),
                extra={**r.rest(), **ids})


def _read_easyedit(r: _Rec) -> dict:
    return dict(prompt=r.text("prompt", True), subject=r.text("subject", True),
                target=r.text("target_new", True), target_true=r.text("ground_truth"),
                relation=r.text("relation_id"), paraphrases=r.texts("rephrase_prompt"),
                neighborhood=r.texts("locality_prompt"), extra=r.rest())


def _read_zsre(r: _Rec) -> dict:
    answers = r.texts("answers")
    return dict(prompt=r.text("src", True), subject=r.text("subject", True), target=r.text("alt", True),
                target_true=answers[0] if answers else None, relation=r.text("relation_id"),
                paraphrases=r.texts("rephrase"), neighborhood=r.texts("loc"),
                extra={**r.rest(), **({"answers": answers} if len(answers) > 1 else {})})


def _read_known(r: _Rec) -> dict:
    return dict(prompt=r.text("prompt", True), subject=r.text("subject", True),
                target=r.text("attribute", True), relation=r.text("relation_id"), extra=r.rest())


def _read_kledger(r: _Rec) -> dict:
    return dict(prompt=r.text("prompt", True), subject=r.text("subject", True), target=r.text("target", True),
                relation=r.text("relation"), target_true=r.text("target_true"),
                paraphrases=r.texts("paraphrases"), neighborhood=r.texts("neighborhood"),
                extra={**r.obj("extra").data, **r.rest()})


# Writers take (fact, index, extra) and return the record; they pop the `extra` fields they place,
# and the rest of `extra` is appended as top-level fields.

def _one(prompts: tuple[str, ...]) -> str | list[str]:
    return list(prompts) if len(prompts) > 1 else (prompts[0] if prompts else "")


def _custom_relation(f: Fact) -> dict:
    """`relation_id` for layouts that have none: only when it is not the default template."""
    return {} if f.relation == template_of(f.prompt, f.subject) else {"relation_id": f.relation}


def _target(text: str | None, id_: Any) -> dict:
    return {"str": text or "", **({"id": id_} if id_ is not None else {})}


def _write_counterfact(f: Fact, i: int, extra: dict) -> dict:
    return {"case_id": extra.pop("case_id", i),
            "requested_rewrite": {"prompt": template_of(f.prompt, f.subject), "relation_id": f.relation,
                                  "target_new": _target(f.target, extra.pop("target_new_id", None)),
                                  "target_true": _target(f.target_true, extra.pop("target_true_id", None)),
                                  "subject": f.subject},
            "paraphrase_prompts": list(f.paraphrases), "neighborhood_prompts": list(f.neighborhood)}


def _write_easyedit(f: Fact, i: int, extra: dict) -> dict:
    return {"case_id": extra.pop("case_id", i), "prompt": f.prompt, "subject": f.subject,
            "target_new": f.target, "ground_truth": f.target_true or "",
            "rephrase_prompt": _one(f.paraphrases), "locality_prompt": _one(f.neighborhood),
            "locality_ground_truth": extra.pop("locality_ground_truth", ""), **_custom_relation(f)}


def _write_zsre(f: Fact, i: int, extra: dict) -> dict:
    answers = extra.pop("answers", None)
    if not (isinstance(answers, list) and answers[:1] == [f.target_true]):
        answers = [f.target_true] if f.target_true else []
    pred = extra.pop("pred", f.target_true or "")
    return {"subject": f.subject, "src": f.prompt, "pred": pred, "rephrase": _one(f.paraphrases),
            "alt": f.target, "answers": answers, "loc": _one(f.neighborhood),
            "loc_ans": extra.pop("loc_ans", ""),
            "cond": extra.pop("cond", f"{pred} >> {f.target} || {f.prompt}"),
            **_custom_relation(f)}


def _write_known(f: Fact, i: int, extra: dict) -> dict:
    return {"known_id": extra.pop("known_id", i), "subject": f.subject, "attribute": f.target,
            "template": extra.pop("template", template_of(f.prompt, f.subject)),
            "prediction": extra.pop("prediction", ""), "prompt": f.prompt, "relation_id": f.relation}


def _write_kledger(f: Fact, i: int, extra: dict) -> dict:
    extra.clear()  # to_dict nests extra itself
    return f.to_dict()


@dataclass(frozen=True)
class _Layout:
    marker: str  # the key that identifies the layout
    needs: str  # its required fields, for hints
    read: Callable[[_Rec], dict]
    write: Callable[[Fact, int, dict], dict]


_LAYOUTS = {  # in detection order
    "counterfact": _Layout("requested_rewrite", "requested_rewrite.{prompt, subject, target_new.str}",
                           _read_counterfact, _write_counterfact),
    "zsre": _Layout("src", "src, subject, alt", _read_zsre, _write_zsre),
    "known": _Layout("attribute", "prompt, subject, attribute", _read_known, _write_known),
    "easyedit": _Layout("target_new", "prompt, subject, target_new", _read_easyedit, _write_easyedit),
    "kledger": _Layout("target", "prompt, subject, target", _read_kledger, _write_kledger),
}
_MARKERS = {layout.marker for layout in _LAYOUTS.values()}


def _detect(record: dict) -> str | None:
    return next((name for name, layout in _LAYOUTS.items() if layout.marker in record), None)


def _parse(record: Any, layout: str | None, previous: str | None) -> tuple[str, dict]:
    """(layout, Fact.create arguments) of one JSON record. A record with no layout's marker key
    is taken to be in the previous record's layout, so that it reports its missing field."""
    if not isinstance(record, dict):
        raise InputError(f"expected a JSON object, got {json_kind(record)}", "each record must be a {...} object")
    name = layout or _detect(record) or previous
    if name is None:
        keys = ", ".join(sorted(record)[:8]) or "none"
        raise InputError(f"no known layout matches the record's keys ({keys})",
                         "give the fields of one layout: " +
                         "; ".join(f"{n}: {lay.needs}" for n, lay in _LAYOUTS.items()))
    return name, _LAYOUTS[name].read(_Rec(record, name))


# ---- containers: each yields (place, record) ----

def _syntax_error(path: Path, e: json.JSONDecodeError, line: int, col: int, may_be_cut: bool) -> InputError:
    cut = may_be_cut and (e.pos >= len(e.doc.rstrip()) or e.msg.startswith("Unterminated string"))
    if cut:
        problem = e.msg.removesuffix(" starting at")
        return InputError(f"{path}:{line}:{col}: JSON ends early ({problem}): the file looks truncated",
                          "the file was cut off: export or download it again")
    return InputError(f"{path}:{line}:{col}: malformed JSON: {e.msg}",
                      "fix the JSON at that line and column: a missing comma, quote or bracket?")


def _json_records(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    try:
        data = parse_json(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one complete value, then more: JSON lines in a .json file
            yield from _jsonl_records(path, text)
            return
        raise _syntax_error(path, e, e.lineno, e.colno, True) from None
    except InputError as e:  # nested too deeply, or a number too long
        raise InputError(f"{path}: {e.message}", e.hint) from None
    if isinstance(data, dict) and not _detect(data):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of records, got {json_kind(data)}",
                         "put the records in a top-level [...] list")
    for i, record in enumerate(data):
        yield f"record {i + 1} (index {i})", record


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    lines = text.split("\n")  # not splitlines(): JSON strings may hold U+2028 and friends
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                record = parse_json(line)
            except json.JSONDecodeError as e:
                raise _syntax_error(path, e, n, e.colno, n == last) from None
            except InputError as e:
                raise InputError(f"{path}: line {n}: {e.message}", e.hint) from None
            yield f"line {n}", record


def _split(cell: str) -> list[str]:
    return cell.split(LIST_SEP) if cell.strip() else []


def _csv_records(path: Path, text: str) -> Iterator[tuple[str, dict]]:
    rows = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [h.strip() for h in next(rows)]
        missing = [c for c in _CSV_REQUIRED if c not in header]
        if missing:
            raise InputError(f"{path}: CSV header lacks required column(s) {', '.join(missing)} "
                             f"(it has: {', '.join(header)})",
                             "the first row must name the columns prompt, target, subject; optional: "
                             + ", ".join(CSV_COLUMNS[3:]))
        duplicated = sorted({h for h in header if header.count(h) > 1})
        if duplicated:
            raise InputError(f"{path}: CSV header repeats column(s) {', '.join(duplicated)}",
                             "name each column once")
        for row in rows:
            if not row:
                continue
            if len(row) != len(header):
                raise InputError(f"{path}: line {rows.line_num}: row has {len(row)} fields, the header has "
                                 f"{len(header)}", "quote fields that contain commas, and give every column; "
                                 "an empty field is fine")
            cells = dict(zip(header, row))
            yield f"line {rows.line_num}", dict(
                prompt=cells.pop("prompt"), target=cells.pop("target"), subject=cells.pop("subject"),
                relation=cells.pop("relation", ""), target_true=cells.pop("target_true", ""),
                paraphrases=_split(cells.pop("paraphrases", "")),
                neighborhood=_split(cells.pop("neighborhood", "")), extra=cells)
    except csv.Error as e:
        raise InputError(f"{path}: line {rows.line_num}: malformed CSV: {e}",
                         "check the quotes on that line: a quoted field must end with a quote") from None


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file", "check the path") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory", "give the path of a .json, .jsonl or .csv file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}", "check the file's permissions") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line}: not UTF-8 text "
                         f"(byte 0x{data[e.start]:02x} at offset {e.start})",
                         "re-save the file as UTF-8") from None
    if not text.strip():
        raise InputError(f"{path}: the file is empty", "give a file with at least one record")
    return text


def _check_fmt(path: Path, fmt: str | None) -> None:
    if fmt is not None and fmt not in FORMATS:
        raise InputError(f"{path}: unknown format {fmt!r}", f"use one of: {', '.join(FORMATS)}")


def read_facts(path: str | Path, fmt: str | None = None, limit: int | None = None) -> list[Fact]:
    """Read and validate the facts in `path` (the first `limit` records when given). `fmt` None
    detects the container from the extension and each record's layout from its keys."""
    path = Path(path)
    _check_fmt(path, fmt)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit must be a positive integer, got {limit!r}", "give a limit of 1 or more")
    text = _read_text(path)
    ext = path.suffix.lower()
    is_csv = fmt == "csv" or (fmt is None and ext == ".csv")
    if is_csv:
        records, layout = _csv_records(path, text), None
    else:
        if fmt is None and ext not in (".json", *_LINES_EXT):
            raise InputError(f"{path}: cannot tell the format from the extension {ext or '(none)'!r}",
                             f"name the file .json, .jsonl or .csv, or give a format: {', '.join(FORMATS)}")
        as_lines = (fmt == "jsonl" or ext in _LINES_EXT
                    or (ext != ".json" and not text.lstrip().startswith("[")))
        records = (_jsonl_records if as_lines else _json_records)(path, text)
        layout = fmt if fmt in _LAYOUTS else None
    facts, previous = [], None
    for place, record in islice(records, limit):
        try:
            if not is_csv:
                previous, record = _parse(record, layout, previous)
            facts.append(Fact.create(**record))
        except InputError as e:
            raise InputError(f"{path}: {place}: {e.message}", e.hint) from None
    if not facts:
        raise InputError(f"{path}: no records", "give a file with at least one record")
    return facts


def _csv_cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _csv_list(path: Path, n: int, prompts: tuple[str, ...]) -> str:
    for p in prompts:
        if LIST_SEP.strip() in p:
            raise InputError(f"{path}: fact {n}: prompt {p!r} contains {LIST_SEP.strip()!r}, "
                             "the CSV list separator",
                             "write this fact as jsonl instead")
    return LIST_SEP.join(prompts)


def _csv_text(path: Path, facts: list[Fact]) -> str:
    extras = list(dict.fromkeys(k for f in facts for k in f.extra if k not in CSV_COLUMNS))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS + tuple(extras))
    for n, f in enumerate(facts, 1):
        writer.writerow([f.prompt, f.target, f.subject, f.relation, f.target_true or "",
                         _csv_list(path, n, f.paraphrases), _csv_list(path, n, f.neighborhood),
                         *(_csv_cell(f.extra.get(k, "")) for k in extras)])
    return out.getvalue()


def _record(f: Fact, i: int, layout: str) -> dict:
    extra = dict(f.extra)
    record = _LAYOUTS[layout].write(f, i, extra)
    # extra fields that would make the record look like another layout are not written
    record.update((k, v) for k, v in extra.items() if k not in record and k not in _MARKERS)
    return record


def write_facts(path: str | Path, facts, fmt: str) -> int:
    """Write `facts` to `path` in `fmt` (one of FORMATS); returns how many were written.
    `read_facts(path, fmt)` gives back the fields the format carries (known: no target_true,
    paraphrases or neighborhood; csv: extra values as strings)."""
    path, facts = Path(path), list(facts)
    _check_fmt(path, fmt)
    if fmt is None:
        raise InputError(f"{path}: no format given for writing", f"give one of: {', '.join(FORMATS)}")
    if fmt == "csv":
        text = _csv_text(path, facts)
    else:
        records = [_record(f, i, "kledger" if fmt == "jsonl" else fmt) for i, f in enumerate(facts)]
        try:
            if fmt == "jsonl" or path.suffix.lower() in _LINES_EXT:
                text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            else:
                text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
        except (TypeError, ValueError) as e:
            raise InputError(f"{path}: cannot encode the facts as JSON: {e}",
                             "keep extra values to strings, numbers, lists and objects") from None
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot write: {e.strerror}",
                         "check that the folder exists and is writable") from None
    return len(facts)
