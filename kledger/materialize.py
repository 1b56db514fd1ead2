"""The ledger's edit side: constraints for a commit, and `apply` of any revision.

`Editor` binds a ledger to its model. It loads the base model once, keeps W0 (the base weights of
the edited layers), gets C0 from the ledger's cache (computing it once per model, layer set and
corpus), and:

- `constraints_at(rev)` gathers the stored (key, value) constraints of the facts in force;
- `solve(rev)` is the pure function (W0, constraints, C0, λ) → weights, cached on disk by the
  constraint set, so applying the same revision twice costs one file read;
- `compute(parent, facts)` measures new constraints against apply(parent): sequential editing.

torch and transformers are imported here and in kledger.edit only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .edit import solve as solve_mod
from .edit.hparams import HParams, defaults_for
from .edit.spec import get_weight, set_weight
from .edit.weights import LoadedModel, load_model
from .errors import FingerprintError, ModelError, StateError
from .records import Fact, canonical_json, constraint_digest, sha256_hex, short
from .records import constraints_hash as records_constraints_hash

Progress = Callable[[str, int, int], None]
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def pack(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()


def unpack(blob: bytes, dtype: str, n: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob), dtype=_DTYPES[dtype]).reshape(n).clone()


@dataclass(frozen=True)
class ConstraintRow:
    """One stored constraint: a fact's key and value at one layer."""

    fact_id: str
    layer: int
    key: torch.Tensor  # [d_in] float32
    value: torch.Tensor  # [d_out] float32
    fingerprint: str

    def digest(self) -> str:
        return constraint_digest(self.fact_id, self.layer, self.fingerprint, pack(self.key), pack(self.value))


def constraints_hash(rows: Iterable[ConstraintRow]) -> str:
    """The hash a commit records over the constraints it computed (order-independent)."""
    return records_constraints_hash(r.digest() for r in rows)


class Editor:
    """A ledger's model, C0 and constraints. Create with `Editor(ledger)`; the model loads lazily."""

    def __init__(self, ledger: Any, *, model: str | None = None, corpus: str | os.PathLike | None = None,
                 progress: Progress | None = None):
        self.ledger = ledger
        self.model_name = model or ledger.model
        if self.model_name in (None, "", "none"):
            raise StateError("this ledger has no model (it was made with --model none)",
                             "make a ledger with `kledger init --model NAME` to edit a model")
        corpus = corpus or ledger.store.meta("corpus")
        self.corpus_path = Path(corpus) if corpus else None
        self.progress = progress
        self._lm: LoadedModel | None = None
        self._hp: HParams | None = None
        self._W0: dict[int, torch.Tensor] = {}
        self._base_fp_value: str | None = None
        self._c0: dict[int, torch.Tensor] | None = None
        self._c0_tokens = 0
        self._fp: tuple[str, dict] | None = None
        self._loaded_rev: str | None = "base"  # which revision the in-memory weights hold

    # ------------------------------------------------------------------ model, hparams, C0
    @property
    def lm(self) -> LoadedModel:
        if self._lm is None:
            self._lm = load_model(self.model_name, progress=self.progress)
            for la in self.hparams.layers:
                self._W0[la] = get_weight(self._lm.model, self._lm.spec, la).detach().clone()
        return self._lm

    @property
    def hparams(self) -> HParams:
        """The model's defaults with the ledger's overrides (`kledger init --set KEY=VALUE`)."""
        if self._hp is None:
            lm = self._lm if self._lm is not None else self.lm
            base = defaults_for(lm.model_type, lm.n_layers).to_dict()
            base.update(json.loads(self.ledger.store.meta("hparams") or "{}"))
            self._hp = HParams.from_dict(base)
        return self._hp

    @property
    def W0(self) -> dict[int, torch.Tensor]:
        _ = self.lm
        return self._W0

    def corpus_identity(self) -> tuple[str, str | None]:
        """(corpus fingerprint, text or None). The default corpus is sampled from the model; its
        identity is the model's fingerprint with the sampling settings, so it is not re-sampled
        just to be named."""
        from .edit.stats import SAMPLED_TOKENS, corpus_fingerprint

        hp = self.hparams
        if self.corpus_path is None:
            return sha256_hex(canonical_json(["model-sampled", self._base_fp(), hp.seed, SAMPLED_TOKENS,
                                              hp.c0_seq_len])), None
        try:
            text = self.corpus_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            from .errors import InputError
            raise InputError(f"cannot read corpus {self.corpus_path}: {exc}", "give a UTF-8 text file") from exc
        return corpus_fingerprint(text, hp.c0_tokens), text

    def _base_fp(self) -> str:
        """Hash of the BASE edited tensors and config, taken once, before any edit is written."""
        if self._base_fp_value is None:
            self._ensure_base_weights()
            self._base_fp_value = self.lm.fingerprint(self.hparams.layers)
        return self._base_fp_value

    def c0(self) -> dict[int, torch.Tensor]:
        if self._c0 is not None:
            return self._c0
        hp = self.hparams
        base = self._base_fp()
        corpus_fp, text = self.corpus_identity()
        rows = {r[0]: r for r in self.ledger.store.stats(base, corpus_fp)}
        if all(la in rows for la in hp.layers):
            self._c0 = {la: unpack(rows[la][4], rows[la][2], rows[la][3] ** 2).reshape(rows[la][3], rows[la][3])
                        for la in hp.layers}
            self._c0_tokens = rows[hp.layers[0]][1]
            return self._c0
        from .edit.stats import SAMPLED_TOKENS, compute_c0, default_corpus

        self._ensure_base_weights()
        n_tokens = hp.c0_tokens
        if text is None:  # the default: text sampled once from the base model, cached beside the model
            text, n_tokens = default_corpus(self.lm, SAMPLED_TOKENS, seed=hp.seed, progress=self.progress), SAMPLED_TOKENS
        c0, n = compute_c0(self.lm, hp.layers, text, n_tokens=n_tokens, seq_len=hp.c0_seq_len, bos=hp.bos,
                           progress=self.progress)
        with self.ledger.store.transaction():
            for la, m in c0.items():
                self.ledger.store.put_stats(base, corpus_fp, la, n, "float64", m.shape[0],
                                            m.to(torch.float64).contiguous().numpy().tobytes())
        self._c0, self._c0_tokens = c0, n
        return c0

    def fingerprint(self) -> tuple[str, dict]:
        """(id, body) of what every constraint computed now depends on."""
        if self._fp is None:
            corpus_fp, _ = self.corpus_identity()
            c0 = self.c0()
            body = {"model": self.model_name, "base_model": self._base_fp(),
                    "c0": {"corpus": corpus_fp, "n_tokens": int(self._c0_tokens), "layers": sorted(c0)},
                    "hparams": self.hparams.to_dict()}
            self._fp = (sha256_hex("fingerprint\0" + canonical_json(body)), body)
        return self._fp

    # ------------------------------------------------------------------ constraints in force
    def constraints_at(self, cid: str | None) -> list[ConstraintRow]:
        """The stored constraints of the facts in force at `cid`. A fact's constraints are those
        of the commit that put it in force, or, for a fact brought by a merge, cherry-pick or
        revert (commits that compute nothing), those of the commit that computed it."""
        if cid is None:
            return []
        state = self.ledger.state(cid)
        rows = self.ledger.store.constraints_for_facts(list(state))
        order = self.ledger.store.commit_order()
        best: dict[str, str] = {}
        for commit_id, fact_id, *_ in rows:
            cur = best.get(fact_id)
            if cur is None or commit_id == state[fact_id] or (
                    cur != state[fact_id] and order.get(commit_id, 0) > order.get(cur, 0)):
                best[fact_id] = commit_id
        missing = [f for f in state if f not in best]
        if missing:
            raise StateError(f"{len(missing)} fact(s) in force at {short(cid)} have no stored constraints "
                             f"(e.g. {short(missing[0])}), from commits made without a model",
                             "run `kledger replay` to compute them")
        fp_id, _ = self.fingerprint()
        out, bad = [], set()
        for commit_id, fact_id, layer, dtype, d_in, d_out, key, value, fp in rows:
            if best.get(fact_id) != commit_id:
                continue
            if fp != fp_id:
                bad.add(fp)
            out.append(ConstraintRow(fact_id, layer, unpack(key, dtype, d_in), unpack(value, dtype, d_out), fp))
        if bad:
            self._explain_mismatch(bad.pop())
        return out

    def _explain_mismatch(self, stored_fp: str) -> None:
        body = self.ledger.store.fingerprint(stored_fp) or {}
        _, now = self.fingerprint()
        diffs = [k for k in ("model", "base_model", "c0", "hparams") if body.get(k) != now.get(k)]
        what = {"model": "model", "base_model": "base model weights", "c0": "C0 (corpus or token count)",
                "hparams": "hyper-parameters"}
        raise FingerprintError(
            f"stored constraints were measured with a different {', '.join(what[d] for d in diffs) or 'setup'}",
            "apply with the setup the ledger was made with, or `kledger replay` to measure them again")

    @staticmethod
    def by_layer(rows: list[ConstraintRow], layers: Iterable[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for la in layers:
            sel = sorted((r for r in rows if r.layer == la), key=lambda r: r.fact_id)
            if sel:
                out[la] = (torch.stack([r.key for r in sel]), torch.stack([r.value for r in sel]))
        return out

    # ------------------------------------------------------------------ solve and apply
    def cache_dir(self) -> Path:
        return self.ledger.path / "cache" / "apply"

    def solve(self, cid: str | None, mode: str = "accumulated") -> tuple[dict[int, torch.Tensor], dict]:
        """Edited weights ([d_out, d_in], float32) of every edited layer at `cid`, and info."""
        rows = self.constraints_at(cid)
        hp = self.hparams
        fp_id, _ = self.fingerprint()
        key = sha256_hex(canonical_json([fp_id, mode, sorted(r.digest() for r in rows)]))
        path = self.cache_dir() / f"{key}.safetensors"
        info = {"revision": cid, "facts": len({r.fact_id for r in rows}), "constraints": len(rows), "mode": mode,
                "layers": list(hp.layers), "cache_key": key, "cached": False}
        if path.is_file():
            from safetensors.torch import load_file

            try:
                loaded = load_file(str(path))
                return {int(k): v for k, v in loaded.items()}, {**info, "cached": True}
            except Exception:
                path.unlink(missing_ok=True)  # a corrupt cache entry is recomputed
        weights = self._solve_batches(cid, rows, mode)
        self._store_cache(path, weights)
        return weights, info

    def _solve_batches(self, cid: str | None, rows: list[ConstraintRow], mode: str) -> dict[int, torch.Tensor]:
        """Solve `rows` with their commits as batches, in first-parent order (the order matters
        only for the modes without history; the accumulated solve stacks them)."""
        hp, c0 = self.hparams, self.c0()
        state = self.ledger.state(cid)
        pos = {c: i for i, c in enumerate(reversed(self.ledger.first_parent_chain(cid)))} if cid else {}
        by_commit: dict[int, list[ConstraintRow]] = {}
        for r in rows:
            by_commit.setdefault(pos.get(state[r.fact_id], 0), []).append(r)
        groups = [self.by_layer(by_commit[i], hp.layers) for i in sorted(by_commit)]
        weights = {}
        with solve_mod.no_tf32():
            for la in hp.layers:
                batches = [g[la] for g in groups if la in g]
                W = solve_mod.solve_history(self.W0[la], batches, c0[la], hp.lam, mode) if batches else self.W0[la]
                weights[la] = W.to(torch.float32)
        return weights

    def _store_cache(self, path: Path, weights: dict[int, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({str(k): v.contiguous() for k, v in weights.items()}, str(tmp))
        os.replace(tmp, path)

    def load(self, cid: str | None, mode: str = "accumulated") -> dict:
        """Write the weights at `cid` into the in-memory model."""
        weights, info = self.solve(cid, mode) if cid is not None else ({la: w for la, w in self.W0.items()}, {})
        self._base_fp()  # fix the base fingerprint before the first write
        for la, W in weights.items():
            set_weight(self.lm.model, self.lm.spec, la, W)
        self._loaded_rev = cid or "base"
        return info

    def _ensure_base_weights(self) -> None:
        if self._loaded_rev != "base":
            for la, W in self.W0.items():
                set_weight(self.lm.model, self.lm.spec, la, W)
            self._loaded_rev = "base"

    # ------------------------------------------------------------------ new constraints
    def compute(self, parent: str | None, facts: list[Fact]) -> list[ConstraintRow]:
        """Constraints of `facts` measured against apply(parent): sequential editing."""
        from .edit.engine import EditRequest, compute_constraints

        hp = self.hparams
        fp_id, body = self.fingerprint()
        prior_rows = self.constraints_at(parent)
        prior = self.by_layer(prior_rows, hp.layers)
        self.load(parent)
        requests = [EditRequest(prompt=f.prompt, subject=f.subject, target=f.target) for f in facts]
        new = compute_constraints(self.lm, requests, hp, self.c0(), self.W0, prior, progress=self.progress)
        self._loaded_rev = "computed"
        out = []
        for la, (K, V) in sorted(new.items()):
            for i, f in enumerate(facts):
                out.append(ConstraintRow(f.id, la, K[i].to(torch.float32), V[i].to(torch.float32), fp_id))
        return out


def constraint_db_rows(commit_id: str, rows: list[ConstraintRow]) -> list[tuple]:
    return [(commit_id, r.fact_id, r.layer, "float32", r.key.numel(), r.value.numel(), pack(r.key), pack(r.value),
             r.fingerprint) for r in rows]
