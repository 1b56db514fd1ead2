"""The ledger's edit side: constraints for a commit, and `apply` of any revision.

`Editor` binds a ledger to its model. It loads the base model once, keeps W0 (the base weights of
the edited layers), gets C0 from the ledger's cache (computing it once per model, layer set and
corpus), and:

- `constraints_at(rev)` gathers the stored (key, value) constraints of the facts in force;
- `solve(rev)` is the pure function (W0, constraints, C0, λ) → weights, cached on disk by the
  constraint set, so applying the same revision twice costs one file read;
- `cached(rev)` answers from that cache without loading the model (or importing torch), when the
  ledger remembers which fingerprint the model's files, unchanged since, hash to;
- `compute(parent, facts)` measures new constraints against apply(parent): sequential editing.

The cache key is the fingerprint id, the solver mode and the digests of the constraints in force.
The fingerprint hashes the base model's edited weights, which takes loading the model; so each
time it is computed with the model loaded, the ledger remembers (meta `fingerprint_memo`) the
model's source identity (`kledger.edit.weights.source_identity`: names, sizes, mtimes and inodes
of its files) with its model type and depth, and, for the setup (model name, source identity,
hyper-parameters, corpus contents, library versions), the fingerprint id it hashed to. A changed
file, setting, corpus or version makes a different setup: no remembered id, so the full path
loads the model and checks the fingerprint as always.

torch and transformers are imported here and in kledger.edit only, and only where used: importing
this module and `Editor.cached` need neither.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .edit.hparams import HParams, defaults_for
from .errors import FingerprintError, StateError
from .records import Constraint, Fact, canonical_json, sha256_hex, short
from .settings import Progress

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from .edit.weights import LoadedModel

MEMO_KEY = "fingerprint_memo"  # ledger meta: what the model's files and a setup hashed to
MEMO_FORMAT = 1
MEMO_KEEP = 16  # setups (and model sources) remembered, newest last
CACHE_FORMAT = "kledger-apply-cache/1"


def _weights_digest(weights: Mapping[int, "np.ndarray"]) -> str:
    import numpy as np

    h = hashlib.sha256(CACHE_FORMAT.encode() + b"\0")
    for la in sorted(weights):
        a = np.ascontiguousarray(weights[la], dtype=np.float32)
        h.update(f"{int(la)} {tuple(a.shape)}\0".encode())
        h.update(a.data)
    return h.hexdigest()


def read_cache(path: Path, key: str) -> dict[int, "np.ndarray"] | None:
    """The weights cached under `key` ([d_out, d_in] float32 numpy arrays by layer), or None. A
    file that is unreadable, of another format or key, or whose tensors fail the checksum stored
    with them, is deleted (it is recomputed)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            weights = {int(name): f.get_tensor(name) for name in f.keys()}
        if (meta.get("format") == CACHE_FORMAT and meta.get("key") == key and weights
                and meta.get("sha256") == _weights_digest(weights)):
            return weights
    except Exception:  # noqa: BLE001 - any damage means: not a usable cache entry
        pass
    path.unlink(missing_ok=True)
    return None


def write_cache(path: Path, key: str, weights: Mapping[int, "np.ndarray"]) -> None:
    """Write atomically, with the key and a checksum of the tensors in the file's metadata."""
    import numpy as np
    from safetensors.numpy import save_file

    arrays = {str(int(la)): np.ascontiguousarray(w, dtype=np.float32) for la, w in weights.items()}
    meta = {"format": CACHE_FORMAT, "key": key, "sha256": _weights_digest({int(k): v for k, v in arrays.items()})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(arrays, str(tmp), metadata=meta)
    os.replace(tmp, path)


@dataclass(frozen=True)
class CachedApply:
    """A cache hit found without the model: the weights and what `solve` would report."""

    weights: dict[int, "np.ndarray"]  # [d_out, d_in] float32 by layer
    info: dict
    fingerprint: str
    model_type: str

    def spec(self):
        from types import SimpleNamespace

        from .edit.spec import spec_for

        return spec_for(SimpleNamespace(model_type=self.model_type))


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
        self._W0: dict[int, "torch.Tensor"] = {}
        self._base_fp_value: str | None = None
        self._c0: dict[int, "torch.Tensor"] | None = None
        self._c0_tokens = 0
        self._fp: tuple[str, dict] | None = None
        self._loaded_rev: str | None = "base"  # which revision the in-memory weights hold
        self._source: str | None = None  # identity of the model files loaded (None: unknown)

    # ------------------------------------------------------------------ model, hparams, C0
    @property
    def lm(self) -> LoadedModel:
        if self._lm is None:
            from .edit.spec import get_weight
            from .edit.weights import load_model, source_identity

            env = self.ledger.env
            before = source_identity(self.model_name, env)
            self._lm = load_model(self.model_name, env=env, progress=self.progress)
            after = source_identity(self.model_name, env)
            # remembered only when the files did not change while they were read
            self._source = after if before in (None, after) else None
            for la in self.hparams.layers:
                self._W0[la] = get_weight(self._lm.model, self._lm.spec, la).detach().clone()
        return self._lm

    @property
    def hparams(self) -> HParams:
        """The model's defaults with the ledger's overrides (`kledger init --set KEY=VALUE`)."""
        if self._hp is None:
            lm = self._lm if self._lm is not None else self.lm
            self._hp = self._hparams_for(lm.model_type, lm.n_layers)
        return self._hp

    def _hparams_for(self, model_type: str, n_layers: int) -> HParams:
        base = defaults_for(model_type, n_layers).to_dict()
        base.update(json.loads(self.ledger.store.meta("hparams") or "{}"))
        return HParams.from_dict(base)

    @property
    def W0(self) -> dict[int, "torch.Tensor"]:
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

    def c0(self) -> dict[int, "torch.Tensor"]:
        if self._c0 is not None:
            return self._c0
        hp = self.hparams
        base = self._base_fp()
        corpus_fp, text = self.corpus_identity()
        stored = self.ledger.store.stats(base, corpus_fp)
        if all(la in stored for la in hp.layers):
            import torch

            self._c0 = {la: torch.from_numpy(stored[la][1]) for la in hp.layers}
            self._c0_tokens = stored[hp.layers[0]][0]
            return self._c0
        import torch

        from .edit.stats import SAMPLED_TOKENS, compute_c0, default_corpus
        from .edit.weights import corpus_cache_root

        self._ensure_base_weights()
        n_tokens = hp.c0_tokens
        if text is None:  # the default: text sampled once from the base model, cached beside the model
            text = default_corpus(self.lm, SAMPLED_TOKENS, seed=hp.seed, cache_dir=corpus_cache_root(self.ledger.env),
                                  progress=self.progress)
            n_tokens = SAMPLED_TOKENS
        c0, n = compute_c0(self.lm, hp.layers, text, n_tokens=n_tokens, seq_len=hp.c0_seq_len, bos=hp.bos,
                           progress=self.progress)
        with self.ledger.store.transaction():
            for la, m in c0.items():
                self.ledger.store.put_stats(base, corpus_fp, la, n, m.to("cpu", torch.float64).numpy())
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
            self._remember(self._fp[0])
        return self._fp

    # ------------------------------------------------------------------ the remembered fingerprint
    def _memo(self) -> dict:
        try:
            memo = json.loads(self.ledger.store.meta(MEMO_KEY) or "{}")
        except ValueError:
            return {}
        return memo if isinstance(memo, dict) and memo.get("format") == MEMO_FORMAT else {}

    def _setup_key(self, source: str, hp: HParams) -> str | None:
        """Everything the fingerprint is a function of, cheaply: the model's name and source
        identity (its files), the hyper-parameters, the corpus (its bytes) and the versions of
        the code that hashes them. None when the corpus cannot be read (the full path says why)."""
        from .edit.weights import runtime_versions

        if self.corpus_path is None:
            corpus: list = ["model-sampled"]
        else:
            try:
                corpus = ["file", hashlib.sha256(self.corpus_path.read_bytes()).hexdigest()]
            except OSError:
                return None
        return sha256_hex(canonical_json(["kledger-setup/1", self.model_name, source, hp.to_dict(), corpus,
                                          runtime_versions()]))

    def _remember(self, fp_id: str) -> None:
        """Record, in a writable ledger, the loaded model's source identity and the fingerprint
        id this setup hashes to, so that `cached` can find the cache key without the model."""
        if self._source is None or self._lm is None or getattr(self.ledger.store, "read_only", True):
            return
        key = self._setup_key(self._source, self.hparams)
        if key is None:
            return
        memo = self._memo() or {"format": MEMO_FORMAT}
        models, fps = dict(memo.get("models") or {}), dict(memo.get("fingerprints") or {})
        model = {"model_type": self._lm.model_type, "n_layers": self._lm.n_layers}
        if models.get(self._source) == model and fps.get(key) == fp_id:
            return
        for d, k, v in ((models, self._source, model), (fps, key, fp_id)):
            d.pop(k, None)
            d[k] = v  # newest last
            while len(d) > MEMO_KEEP:
                d.pop(next(iter(d)))
        self.ledger.store.set_meta(MEMO_KEY, json.dumps({"format": MEMO_FORMAT, "models": models,
                                                          "fingerprints": fps}))

    def _remembered(self) -> tuple[str, HParams, str] | None:
        """(fingerprint id, hparams, model type) for the model's files as they are now, from the
        ledger's memory, without loading the model; None when not remembered."""
        from .edit.weights import source_identity

        source = source_identity(self.model_name, self.ledger.env)
        if source is None:
            return None
        memo = self._memo()
        model = (memo.get("models") or {}).get(source)
        if not isinstance(model, dict):
            return None
        try:
            hp = self._hparams_for(model["model_type"], int(model["n_layers"]))
        except Exception:  # noqa: BLE001 - bad settings: the full path reports them
            return None
        key = self._setup_key(source, hp)
        fp_id = (memo.get("fingerprints") or {}).get(key) if key else None
        return (fp_id, hp, model["model_type"]) if isinstance(fp_id, str) else None

    # ------------------------------------------------------------------ constraints in force
    def _rows_at(self, cid: str | None) -> list[Constraint]:
        """The stored constraints of the facts
        in force at `cid`. A fact's constraints are those of the commit that put it in force, or,
        for a fact brought by a merge, cherry-pick or revert (commits that compute nothing), those
        of the commit that computed it. Needs neither the model nor torch."""
        if cid is None:
            return []
        state = self.ledger.state(cid)
        rows = self.ledger.store.constraints_for_facts(list(state))
        order = self.ledger.store.commit_order()
        best: dict[str, str] = {}
        for r in rows:
            cur = best.get(r.fact_id)
            if cur is None or r.commit_id == state[r.fact_id] or (
                    cur != state[r.fact_id] and order.get(r.commit_id, 0) > order.get(cur, 0)):
                best[r.fact_id] = r.commit_id
        missing = [f for f in state if f not in best]
        if missing:
            raise StateError(f"{len(missing)} fact(s) in force at {short(cid)} have no stored constraints "
                             f"(e.g. {short(missing[0])}), from commits made without a model",
                             "run `kledger replay` to compute them")
        return [r for r in rows if best.get(r.fact_id) == r.commit_id]

    def constraints_at(self, cid: str | None) -> list[Constraint]:
        """The stored constraints of the facts in force at `cid` (see `_rows_at`); a
        FingerprintError if any was measured under another setup."""
        if cid is None:
            return []
        rows = self._rows_at(cid)
        fp_id, _ = self.fingerprint()
        bad = {r.fingerprint for r in rows if r.fingerprint != fp_id}
        if bad:
            self._explain_mismatch(bad.pop())
        return rows

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
    def by_layer(rows: list[Constraint], layers: Iterable[int]) -> dict[int, tuple["torch.Tensor", "torch.Tensor"]]:
        import numpy as np
        import torch

        out = {}
        for la in layers:
            sel = sorted((r for r in rows if r.layer == la), key=lambda r: r.fact_id)
            if sel:
                out[la] = (torch.from_numpy(np.stack([r.key for r in sel])),
                           torch.from_numpy(np.stack([r.value for r in sel])))
        return out

    # ------------------------------------------------------------------ solve and apply
    def cache_dir(self) -> Path:
        return self.ledger.path / "cache" / "apply"

    @staticmethod
    def _cache_key(fp_id: str, mode: str, digests: Iterable[str]) -> str:
        return sha256_hex(canonical_json([fp_id, mode, sorted(digests)]))

    def _info(self, cid: str | None, fact_ids: Iterable[str], n_rows: int, mode: str, hp: HParams, key: str,
              cached: bool) -> dict:
        return {"revision": cid, "facts": len(set(fact_ids)), "constraints": n_rows, "mode": mode,
                "layers": list(hp.layers), "cache_key": key, "cached": cached}

    def cached(self, cid: str | None, mode: str = "accumulated") -> CachedApply | None:
        """The weights at `cid` from the apply cache, found without loading the model when the
        ledger remembers the fingerprint of the model's files as they are now; None on any miss
        (nothing remembered, files changed, constraints of another fingerprint, no or a damaged
        cache file). `solve` then does the full work and its checks."""
        if self._lm is not None:
            fp_id, _ = self.fingerprint()
            hp, model_type = self.hparams, self._lm.model_type
        else:
            got = self._remembered()
            if got is None:
                return None
            fp_id, hp, model_type = got
        rows = self._rows_at(cid)
        if any(r.fingerprint != fp_id for r in rows):
            return None  # measured under another setup: `solve` explains the mismatch
        key = self._cache_key(fp_id, mode, (r.digest() for r in rows))
        weights = read_cache(self.cache_dir() / f"{key}.safetensors", key)
        if weights is None or sorted(weights) != sorted(hp.layers):
            return None
        info = self._info(cid, (r.fact_id for r in rows), len(rows), mode, hp, key, True)
        return CachedApply(weights, info, fp_id, model_type)

    def solve(self, cid: str | None, mode: str = "accumulated") -> tuple[dict[int, "torch.Tensor"], dict]:
        """Edited weights ([d_out, d_in], float32) of every edited layer at `cid`, and info."""
        import torch

        rows = self.constraints_at(cid)
        hp = self.hparams
        fp_id, _ = self.fingerprint()
        key = self._cache_key(fp_id, mode, (r.digest() for r in rows))
        path = self.cache_dir() / f"{key}.safetensors"
        info = self._info(cid, (r.fact_id for r in rows), len(rows), mode, hp, key, False)
        hit = read_cache(path, key)
        if hit is not None and sorted(hit) == sorted(hp.layers):
            return {la: torch.from_numpy(w.copy()) for la, w in hit.items()}, {**info, "cached": True}
        weights = self._solve_batches(cid, rows, mode)
        self._store_cache(path, key, weights)
        return weights, info

    @staticmethod
    def _store_cache(path: Path, key: str, weights: Mapping[int, "torch.Tensor"]) -> None:
        import torch

        write_cache(path, key, {la: w.detach().to("cpu", torch.float32).numpy() for la, w in weights.items()})

    def _solve_batches(self, cid: str | None, rows: list[Constraint], mode: str) -> dict[int, "torch.Tensor"]:
        """Solve `rows` with their commits as batches, in first-parent order (the order matters
        only for the modes without history; the accumulated solve stacks them)."""
        import torch

        from .edit import solve as solve_mod

        hp, c0 = self.hparams, self.c0()
        state = self.ledger.state(cid)
        pos = {c: i for i, c in enumerate(reversed(self.ledger.first_parent_chain(cid)))} if cid else {}
        by_commit: dict[int, list[Constraint]] = {}
        for r in rows:
            by_commit.setdefault(pos.get(state[r.fact_id], 0), []).append(r)
        groups = [self.by_layer(by_commit[i], hp.layers) for i in sorted(by_commit)]
        weights = {}
        with solve_mod.no_tf32():
            for la in hp.layers:
                batches = [g[la] for g in groups if la in g]
                W = (solve_mod.solve_history(self.W0[la], batches, c0[la], hp.lam, mode, device=self.lm.device)
                     if batches else self.W0[la])
                weights[la] = W.to(torch.float32)
        return weights

    def load(self, cid: str | None, mode: str = "accumulated",
             weights: Mapping[int, "torch.Tensor"] | None = None) -> dict:
        """Write the weights at `cid` into the in-memory model (`weights`: those `solve(cid, mode)`
        returned, to save solving or reading them again)."""
        from .edit.spec import set_weight

        info: dict = {}
        if weights is None:
            weights, info = self.solve(cid, mode) if cid is not None else ({la: w for la, w in self.W0.items()}, {})
        self._base_fp()  # fix the base fingerprint before the first write
        for la, W in weights.items():
            set_weight(self.lm.model, self.lm.spec, la, W)
        self._loaded_rev = cid or "base"
        return info

    def _ensure_base_weights(self) -> None:
        from .edit.spec import set_weight

        if self._loaded_rev != "base":
            for la, W in self.W0.items():
                set_weight(self.lm.model, self.lm.spec, la, W)
            self._loaded_rev = "base"

    # ------------------------------------------------------------------ new constraints
    def compute(self, parent: str | None, facts: list[Fact], exclude: Iterable[str] = ()) -> list[Constraint]:
        """Constraints of `facts` measured against apply(parent): sequential editing. With
        `exclude`, against the solve of parent's constraints without those facts' (as if they had
        never been made: `resolve` re-measures a kept fact this way when it was measured on top of
        the facts that lost)."""
        import torch

        from .edit.engine import EditRequest, compute_constraints

        hp = self.hparams
        fp_id, body = self.fingerprint()
        prior_rows = self.constraints_at(parent)
        excluded = set(exclude)
        if excluded and parent is not None:
            prior_rows = [r for r in prior_rows if r.fact_id not in excluded]
            self.load(parent, weights=self._solve_batches(parent, prior_rows, hp.mode))
        else:
            self.load(parent)
        prior = self.by_layer(prior_rows, hp.layers)
        requests = [EditRequest(prompt=f.prompt, subject=f.subject, target=f.target) for f in facts]
        new = compute_constraints(self.lm, requests, hp, self.c0(), self.W0, prior, progress=self.progress)
        self._loaded_rev = "computed"
        out = []
        for la, (K, V) in sorted(new.items()):
            for i, f in enumerate(facts):
                out.append(Constraint(f.id, la, K[i].to("cpu", torch.float32).numpy(),
                                      V[i].to("cpu", torch.float32).numpy(), fp_id))
        return out
