"""Immutable records and their content hashes.

Facts and commits are content-addressed: the id is the SHA-256 of a canonical JSON encoding of
everything that defines them, so `kledger fsck` can re-hash and compare. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable

from .errors import RESTORE_HINT, InputError, IntegrityError

SUBJECT_SLOT = "{}"
OP_ADD = "add"
OP_RETRACT = "retract"


def canonical_json(obj: Any) -> str:
    """The one encoding that ids are hashed over: sorted keys, no whitespace, UTF-8 kept."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def parse_json(text: str) -> Any:
    """`json.loads`, with the two inputs Python's reader fails on without a JSONDecodeError made
    InputErrors: nesting deeper than the interpreter's recursion allows, and an integer of over
    4,300 digits (Python's int-str limit). A JSONDecodeError passes through, for the caller to place."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise InputError("the JSON is nested too deeply to read",
                         "records are objects a few levels deep: check that this is the file you meant") from None
    except ValueError:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise InputError("the JSON holds an integer of over 4,300 digits, too long for Python to read",
                         "write a number that long as a string") from None


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# How deeply a JSON value kept with a record (a fact's `extra`, a commit's `meta`) may nest. Deeper
# values are refused: Python's JSON reader and writer recurse, and would fail later, on reading.
MAX_DEPTH = 64


def json_kind(value: Any) -> str:
    """A JSON value's type, in JSON words."""
    if isinstance(value, bool):
        return "true/false"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def check_text(value: Any, what: str, optional: bool = False) -> Any:
    """`value`, when it is a string that UTF-8 can encode (or None, when `optional`); else an
    InputError naming `what`. Undecodable bytes reach Python as lone surrogates, which no id
    could be hashed over."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise InputError(f"{what} must be a string, got {json_kind(value)}", f"make {what} a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{what} is not valid UTF-8 text: character {exc.start + 1} is a lone surrogate "
                         f"(U+{ord(value[exc.start]):04X}), as undecodable bytes become",
                         "save the input as UTF-8, or set a UTF-8 locale") from None
    return value


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether a JSON value nests lists and objects more than `limit` levels deep (no recursion)."""
    level, depth = [value], 0
    while level:
        level = [v for x in level if isinstance(x, (dict, list, tuple))
                 for v in (x.values() if isinstance(x, dict) else x)]
        depth += bool(level)
        if depth > limit:
            return True
    return False


def check_json(value: Any, what: str) -> Any:
    """`value`, when it can be kept with a record: JSON types only, UTF-8 text, numbers JSON can
    write, nested at most MAX_DEPTH levels; else an InputError naming `what`."""
    if too_deep(value):
        raise InputError(f"{what} is nested more than {MAX_DEPTH} levels deep",
                         "keep extra data to a few levels of objects and lists")
    try:
        canonical_json(value).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{what} holds text that is not valid UTF-8 (a lone surrogate)",
                         "save the input as UTF-8") from None
    except (TypeError, ValueError) as exc:  # a non-JSON type; an integer of over 4,300 digits
        raise InputError(f"{what} cannot be kept as JSON: {exc}",
                         "keep extra values to strings, numbers, lists and objects") from None
    return value


def _prompts(value: Any, what: str) -> tuple[str, ...]:
    """Evaluation prompts: a list of strings, or a lone string as one prompt; blanks dropped."""
    if isinstance(value, str):
        value = [value]
    if value is None:
        value = []
    if isinstance(value, (dict, bytes)) or not isinstance(value, Iterable):
        raise InputError(f"{what} must be a list of strings, got {json_kind(value)}",
                         f"give {what} as a list of prompts, e.g. [\"The Eiffel Tower is in\"]")
    out = []
    for i, p in enumerate(value, 1):
        if not isinstance(p, str):
            raise InputError(f"{what} item {i} must be a string, got {json_kind(p)}",
                             f"give {what} as a list of prompts")
        if check_text(p, f"{what} item {i}").strip():
            out.append(p.strip())
    return tuple(out)


_PUNCT = str.maketrans({c: " " for c in string.punctuation + "“”‘’«»–—"})


def normalize(text: str) -> str:
    """Matching form of a subject or object: case-folded, NFKC, punctuation and runs of spaces
    collapsed. "  The Eiffel Tower. " and "the eiffel tower" match."""
    text = unicodedata.normalize("NFKC", text).casefold().translate(_PUNCT)
    return " ".join(text.split())


def template_of(prompt: str, subject: str) -> str:
    """The relation template of a prompt: the (first) subject occurrence replaced by `{}`."""
    i = prompt.find(subject)
    if i < 0:
        raise InputError(f"subject {subject!r} does not occur in prompt {prompt!r}",
                         "give the subject exactly as it is spelled in the prompt")
    return prompt[:i] + SUBJECT_SLOT + prompt[i + len(subject):]


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) edit request.

    `prompt` is the full text the model completes ("The Eiffel Tower is located in"); it contains
    `subject`. `target` is the new object ("Rome"), stored without a leading space. `relation` is a
    relation id when the data gives one (CounterFact's P-codes), else the prompt template with the
    subject replaced by `{}`. `target_true` is the object before the edit, when known. `paraphrases`
    and `neighborhood` are evaluation prompts; `extra` keeps any other field of the source record.
    """

    subject: str
    prompt: str
    target: str
    relation: str = ""
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def create(cls, prompt: str, target: str, subject: str, relation: str | None = None,
               target_true: str | None = None, paraphrases: Iterable[str] | str = (),
               neighborhood: Iterable[str] | str = (), extra: dict | None = None) -> "Fact":
        """Validate and normalise user input; raises InputError with a fix on bad input.
        `paraphrases` and `neighborhood` are lists of prompts; a lone string is one prompt."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("empty prompt", "give the text the model should complete")
        if not isinstance(subject, str) or not subject.strip():
            raise InputError(f"empty subject for prompt {prompt!r}",
                             "give --subject, the entity the fact is about, as spelled in the prompt")
        if not isinstance(target, str) or not target.strip():
            raise InputError(f"empty target for prompt {prompt!r}", "give the new object, e.g. 'Rome'")
        prompt = check_text(prompt, "'prompt'").strip()
        subject = check_text(subject, "'subject'").strip()
        target = check_text(target, "'target'").strip()
        if subject not in prompt:
            raise InputError(f"subject {subject!r} does not occur in prompt {prompt!r}",
                             "give the subject exactly as it is spelled in the prompt")
        if "{}" in prompt:
            raise InputError(f"prompt {prompt!r} still contains '{{}}'",
                             "fill the subject into the prompt, or use a template-aware format")
        rel = (check_text(relation, "'relation'", optional=True) or "").strip() or template_of(prompt, subject)
        tt = check_text(target_true, "'target_true'", optional=True)
        tt = tt.strip() if tt and tt.strip() else None
        if extra is not None and not isinstance(extra, dict):
            raise InputError(f"'extra' must be an object, got {json_kind(extra)}",
                             "give extra fields as a JSON object, e.g. {\"case_id\": 7}")
        return cls(subject=subject, prompt=prompt, target=target, relation=rel, target_true=tt,
                   paraphrases=_prompts(paraphrases, "'paraphrases'"),
                   neighborhood=_prompts(neighborhood, "'neighborhood'"),
                   extra=check_json(dict(extra or {}), "'extra'"))

    def to_dict(self) -> dict:
        return {"subject": self.subject, "prompt": self.prompt, "target": self.target,
                "relation": self.relation, "target_true": self.target_true,
                "paraphrases": list(self.paraphrases), "neighborhood": list(self.neighborhood),
                "extra": self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> "Fact":
        return cls(subject=d["subject"], prompt=d["prompt"], target=d["target"],
                   relation=d.get("relation") or "", target_true=d.get("target_true"),
                   paraphrases=tuple(d.get("paraphrases") or ()),
                   neighborhood=tuple(d.get("neighborhood") or ()), extra=dict(d.get("extra") or {}))

    @property
    def id(self) -> str:
        return fact_id(self.to_dict())

    @property
    def key(self) -> tuple[str, str]:
        """(subject, relation) in matching form: two facts with the same key and different
        objects contradict each other when the relation is single-valued."""
        return (normalize(self.subject), relation_key(self.relation))

    @property
    def object_key(self) -> str:
        return normalize(self.target)


class ById(dict):
    """Records by id, as the store returns them. The ids a command asks for come from the ledger
    itself, so a missing one means the ledger is damaged: an IntegrityError that says so."""

    def __init__(self, what: str, rows: Any = ()):
        super().__init__(rows)
        self.what = what

    def __missing__(self, key: Any) -> Any:
        raise IntegrityError(f"the ledger is damaged: {self.what} {str(key)[:10]} is missing",
                             "run `kledger fsck` to see what else is wrong, then " + RESTORE_HINT)


def relation_key(relation: str) -> str:
    """Matching form of a relation: ids as given, templates with spaces collapsed and case folded."""
    if SUBJECT_SLOT in relation:
        return " ".join(unicodedata.normalize("NFKC", relation).casefold().split())
    return relation.strip()


def fact_id(fact_dict: dict) -> str:
    return sha256_hex("fact\0" + canonical_json(fact_dict))


@dataclass(frozen=True)
class Op:
    """A change a commit makes to the facts in force: add a fact or retract one."""

    op: str
    fact_id: str

    def to_list(self) -> list[str]:
        return [self.op, self.fact_id]


@dataclass(frozen=True)
class Commit:
    """A commit. `ops` are relative to the first parent: the facts in force at a commit are those
    of its first parent with `ops` applied in order. `constraints` is the hash of the stored
    (key, value) constraints the commit computed (None when none were computed)."""

    parents: tuple[str, ...]
    ops: tuple[Op, ...]
    message: str
    author: str
    timestamp: str  # ISO 8601, UTC
    constraints: str | None = None
    meta: dict = field(default_factory=dict, hash=False, compare=False)

    def payload(self) -> dict:
        return {"parents": list(self.parents), "ops": [o.to_list() for o in self.ops],
                "message": self.message, "author": self.author, "timestamp": self.timestamp,
                "constraints": self.constraints, "meta": self.meta}

    @property
    def id(self) -> str:
        return commit_id(self.payload())


def commit_id(payload: dict) -> str:
    return sha256_hex("commit\0" + canonical_json(payload))


def constraint_digest(fact_id: str, layer: int, fingerprint: str, key: bytes, value: bytes) -> str:
    """Hash of one stored constraint: the fact, the layer, what it was measured with, and the raw
    float32 bytes of its key and value."""
    h = hashlib.sha256(f"{fact_id}\0{int(layer)}\0{fingerprint}\0".encode())
    h.update(key)
    h.update(value)
    return h.hexdigest()


def blob_digest(blob: bytes) -> str:
    """SHA-256 of stored bytes (a C0 matrix's checksum)."""
    return hashlib.sha256(blob).hexdigest()


def _f32(vector: Any) -> bytes:
    import numpy as np

    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


@dataclass(frozen=True, eq=False)
class Constraint:
    """One (key, value) constraint: a fact's key k (the down-projection's input at the subject's
    last token) and target value v at one edited layer, measured under `fingerprint` (what it
    depends on: base model, C0, hyper-parameters) by commit `commit_id` (None before it is
    stored). `key` and `value` are float32 numpy vectors ([d_in], [d_out]), or with R key
    readings per fact (`HParams.key_readings`) [R, d_in] and [R, d_out] rows."""

    fact_id: str
    layer: int
    key: Any
    value: Any
    fingerprint: str
    commit_id: str | None = None

    def digest(self) -> str:
        """Covers the fact, the layer, the fingerprint and the float32 bytes of key and value."""
        return constraint_digest(self.fact_id, self.layer, self.fingerprint, _f32(self.key), _f32(self.value))


def soft_key(key: Any) -> Any:
    """The key soft conflicts compare (kledger.conflicts) of a fact's stored key: the key itself
    ([d]), or of its readings ([R, d], `HParams.key_readings`) the last, the prefixed contexts'
    mean, which is nearest the context mean the soft threshold was chosen on."""
    return key if key.ndim == 1 else key[-1]


def constraints_hash(constraints: Iterable[Constraint]) -> str | None:
    """The hash a commit records over the constraints it measured (order-independent); None for
    no constraints."""
    return digests_hash(c.digest() for c in constraints)


def digests_hash(digests: Iterable[str]) -> str | None:
    """`constraints_hash` from the constraints' digests (`Constraint.digest`, `constraint_digest`)."""
    digests = sorted(digests)
    return sha256_hex("constraints\0" + "\n".join(digests)) if digests else None


def short(id_: str, n: int = 10) -> str:
    return id_[:n]


_HEX = re.compile(r"^[0-9a-f]{4,64}$")


def looks_like_id(text: str) -> bool:
    return bool(_HEX.match(text))
