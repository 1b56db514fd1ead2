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

from .errors import InputError

SUBJECT_SLOT = "{}"
OP_ADD = "add"
OP_RETRACT = "retract"


def canonical_json(obj: Any) -> str:
    """The one encoding that ids are hashed over: sorted keys, no whitespace, UTF-8 kept."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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
               target_true: str | None = None, paraphrases: Iterable[str] = (),
               neighborhood: Iterable[str] = (), extra: dict | None = None) -> "Fact":
        """Validate and normalise user input; raises InputError with a fix on bad input."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("empty prompt", "give the text the model should complete")
        if not isinstance(subject, str) or not subject.strip():
            raise InputError(f"empty subject for prompt {prompt!r}",
                             "give --subject, the entity the fact is about, as spelled in the prompt")
        if not isinstance(target, str) or not target.strip():
            raise InputError(f"empty target for prompt {prompt!r}", "give the new object, e.g. 'Rome'")
        prompt = prompt.strip()
        subject = subject.strip()
        target = target.strip()
        if subject not in prompt:
            raise InputError(f"subject {subject!r} does not occur in prompt {prompt!r}",
                             "give the subject exactly as it is spelled in the prompt")
        if "{}" in prompt:
            raise InputError(f"prompt {prompt!r} still contains '{{}}'",
                             "fill the subject into the prompt, or use a template-aware format")
        rel = (relation or "").strip() or template_of(prompt, subject)
        tt = target_true.strip() if isinstance(target_true, str) and target_true.strip() else None
        return cls(subject=subject, prompt=prompt, target=target, relation=rel, target_true=tt,
                   paraphrases=tuple(p.strip() for p in paraphrases if isinstance(p, str) and p.strip()),
                   neighborhood=tuple(p.strip() for p in neighborhood if isinstance(p, str) and p.strip()),
                   extra=dict(extra or {}))

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
    stored). `key` and `value` are float32 numpy vectors ([d_in], [d_out])."""

    fact_id: str
    layer: int
    key: Any
    value: Any
    fingerprint: str
    commit_id: str | None = None

    def digest(self) -> str:
        """Covers the fact, the layer, the fingerprint and the float32 bytes of key and value."""
        return constraint_digest(self.fact_id, self.layer, self.fingerprint, _f32(self.key), _f32(self.value))


def constraints_hash(constraints: Iterable[Constraint]) -> str | None:
    """The hash a commit records over the constraints it measured (order-independent); None for
    no constraints."""
    digests = sorted(c.digest() for c in constraints)
    return sha256_hex("constraints\0" + "\n".join(digests)) if digests else None


def short(id_: str, n: int = 10) -> str:
    return id_[:n]


_HEX = re.compile(r"^[0-9a-f]{4,64}$")


def looks_like_id(text: str) -> bool:
    return bool(_HEX.match(text))
