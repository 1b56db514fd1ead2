"""The model side: a base model with its C0, the solve of stored constraints, and the measuring of
new ones. Knows nothing of commits: it is given constraints and returns weights or constraints.

`Editor(model, store=..., cache_dir=...)` loads the base model once (lazily), keeps W0 (the base
weights of the edited layers), gets C0 from the store (computing it once per model, layer set and
corpus), and:

- `solve(batches, mode)` is the pure function (W0, constraints, C0, λ) → weights, cached on disk
  by the constraint set (kledger.edit.cache), so solving the same set twice costs one file read;
- `cached(batches, mode)` answers from that cache without loading the model (or importing torch),
  when the store remembers which fingerprint the model's files, unchanged since, hash to;
- `measure(prior, facts)` measures new constraints against the solve of `prior`: sequential
  editing;
- `check(constraints)` refuses constraints measured under another fingerprint, saying what differs.

`batches` are constraints grouped by the commit that put their facts in force, oldest first (the
order matters only for the solver modes without history).

The fingerprint hashes the base model's edited weights, which takes loading the model; so each
time it is computed with the model loaded, the store remembers (meta `fingerprint_memo`) the
model's source identity (`kledger.edit.weights.source_identity`: names, sizes, mtimes and inodes
of its files) with its model type and depth, and, for the setup (model name, source identity,
hyper-parameters, corpus contents, library versions), the fingerprint id it hashed to. A changed
file, setting, corpus or version makes a different setup: no remembered id, so the full path
loads the model and checks the fingerprint as always.

torch and transformers are imported only where used: importing this module and `Editor.cached`
need neither.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Iterable, Mapping, Protocol, Sequence

from ..errors import FingerprintError, InputError, ModelError, StateError
from ..records import Constraint, Fact, canonical_json, sha256_hex
from ..settings import Progress, Settings
from .cache import CachedApply, cache_key, read_cache, write_cache
from .hparams import DEFAULTS_VERSION, HParams, defaults_for

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from .solve import KV
    from .weights import LoadedModel

MEMO_KEY = "fingerprint_memo"  # store meta: what the model's files and a setup hashed to
WEIGHTS_KEY = "base_weights"  # store meta: base fingerprint → SHA-256 of every tensor of that model
MEMO_FORMAT = 1
MEMO_KEEP = 16  # setups (and model sources) remembered, newest last
Batches = Sequence[Sequence[Constraint]]  # constraints by commit, oldest first


class EditorStore(Protocol):
    """What the Editor needs of a store (kledger.store.Store is one): meta for the fingerprint
    memo, C0 statistics, stored fingerprint bodies (to explain a mismatch), transactions."""

    read_only: bool  # a reading store keeps the writes in memory until the command writes (Store.upgrade)

    def meta(self, key: str, default: str | None = None) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...

    def stats(self, model_fp: str, corpus_fp: str) -> dict[int, tuple[int, "np.ndarray"]]: ...

    def put_stats(self, model_fp: str, corpus_fp: str, layer: int, n_tokens: int, matrix: "np.ndarray") -> None: ...

    def fingerprint(self, fid: str) -> dict | None: ...

    def transaction(self) -> ContextManager[Any]: ...


def _mismatch(diffs: list[str]) -> None:
    """A FingerprintError naming what differs (nothing when `diffs` is empty)."""
    if not diffs:
        return
    what = {"model": "model", "base_model": "base model weights", "c0": "C0 (corpus or token count)",
            "hparams": "hyper-parameters", "setup": "setup"}
    raise FingerprintError(f"stored constraints were measured with a different {', '.join(what[d] for d in diffs)}",
                           "apply with the setup the ledger was made with, or `kledger replay` to measure them again")


def flatten(batches: Batches) -> list[Constraint]:
    return [r for b in batches for r in b]


class Editor:
    """A base model, its C0 and the solve of constraints. The model loads lazily."""

    def __init__(self, model: str, *, store: EditorStore, cache_dir: str | os.PathLike,
                 overrides: Mapping[str, Any] | None = None, corpus: str | os.PathLike | None = None,
                 env: Settings | None = None, progress: Progress | None = None, cache_secret: str | None = None,
                 defaults_version: int = DEFAULTS_VERSION, prior_dir: str | os.PathLike | None = None):
        """`cache_secret`: the key of the apply cache's MACs (kledger.edit.cache); None: no cache.
        `defaults_version`: which version of the default hyper-parameters the overrides apply to
        (the one the ledger was made with). `prior_dir`: where the inverse of λC0 is kept for
        small solves (kledger.edit.prior; default: `prior` in `cache_dir`)."""
        if model in (None, "", "none"):
            raise StateError("no model to edit", "give a model name or directory")
        self.model_name = model
        self.store = store
        self.cache_dir = Path(cache_dir)
        self.cache_secret = cache_secret
        self.prior_dir = Path(prior_dir) if prior_dir is not None else self.cache_dir / "prior"
        self.overrides = dict(overrides or {})  # hyper-parameters over the model's defaults
        self.defaults_version = defaults_version
        self.corpus_path = Path(corpus) if corpus else None
        self.env = env or Settings()
        self.progress = progress
        self._lm: LoadedModel | None = None
        self._hp: HParams | None = None
        self._W0: dict[int, "torch.Tensor"] = {}
        self._base_fp_value: str | None = None
        self._c0: dict[int, "torch.Tensor"] | None = None
        self._c0_tokens = 0
        self._fp: tuple[str, dict] | None = None
        self._at_base = True  # whether the in-memory weights are the base weights
        self._source: str | None = None  # identity of the model files loaded (None: unknown)
        self._verified: tuple[str, str, bool] | None = None  # (base fp, digest, new) to record

    # ------------------------------------------------------------------ model, hparams, C0
    @property
    def lm(self) -> LoadedModel:
        if self._lm is None:
            from . import weights
            from .spec import down_proj, get_weight

            before = weights.source_identity(self.model_name, self.env)
            self._lm = weights.load_model(self.model_name, env=self.env, progress=self.progress)
            after = weights.source_identity(self.model_name, self.env)
            # remembered only when the files did not change while they were read
            self._source = after if before in (None, after) else None
            for la in self.hparams.layers:
                if down_proj(self._lm.model, self._lm.spec, la).weight.device.type == "meta":
                    raise ModelError(f"edited layer {la} was offloaded to disk (KLEDGER_MAX_MEMORY): the edited "
                                     "layers must sit on a device", "give the first devices more memory")
                self._W0[la] = get_weight(self._lm.model, self._lm.spec, la).detach().clone()
        return self._lm

    @property
    def hparams(self) -> HParams:
        """The model's defaults with the overrides (`kledger init --set KEY=VALUE`)."""
        if self._hp is None:
            lm = self._lm if self._lm is not None else self.lm
            self._hp = self._hparams_for(lm.model_type, lm.n_layers)
        return self._hp

    def _hparams_for(self, model_type: str, n_layers: int) -> HParams:
        base = defaults_for(model_type, n_layers, self.defaults_version).to_dict()
        base.update(self.overrides)
        return HParams.from_dict(base)

    @property
    def W0(self) -> dict[int, "torch.Tensor"]:
        _ = self.lm
        return self._W0

    def corpus_identity(self) -> tuple[str, str | None]:
        """(corpus fingerprint, text or None). The default corpus is sampled from the model; its
        identity is the model's fingerprint with the sampling settings, so it is not re-sampled
        just to be named."""
        return self._corpus_identity(self.hparams, self._base_fp if self.corpus_path is None else None)

    def _corpus_identity(self, hp: HParams, base: Any) -> tuple[str, str | None]:
        """`corpus_identity` under `hp`; `base` gives the base fingerprint (a string, or a function
        returning it), asked only for the default corpus."""
        from .hparams import SAMPLED_TOKENS, corpus_fingerprint

        if self.corpus_path is None:
            what = ["model-sampled", base() if callable(base) else base, hp.seed, SAMPLED_TOKENS, hp.c0_seq_len]
            if hp.c0_sampler != 1:  # sampler 1's identities keep their first form
                what.append(f"sampler{hp.c0_sampler}")
            return sha256_hex(canonical_json(what)), None
        try:
            text = self.corpus_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read corpus {self.corpus_path}: {exc}", "give a UTF-8 text file") from exc
        return corpus_fingerprint(text, hp.c0_tokens), text

    def sampled_corpus(self) -> str:
        """The default C0 corpus: text sampled once from the base model (cached beside the model
        cache, `Settings.model_cache`)."""
        from .stats import SAMPLED_TOKENS, default_corpus
        from .weights import corpus_cache_root

        self._ensure_base_weights()
        return default_corpus(self.lm, SAMPLED_TOKENS, seed=self.hparams.seed, sampler=self.hparams.c0_sampler,
                              cache_dir=corpus_cache_root(self.env), progress=self.progress)

    def _base_fp(self) -> str:
        """Hash of the BASE edited tensors and config, taken once, before any edit is written;
        every other tensor is checked against what the store recorded for this base model."""
        if self._base_fp_value is None:
            self._ensure_base_weights()
            base = self.lm.fingerprint(self.hparams.layers)
            self._verify_weights(base)
            self._base_fp_value = base
        return self._base_fp_value

    def _verify_weights(self, base: str) -> None:
        """Hash every tensor of the base model (`weights.weights_digest`) and compare it with the
        digest the store recorded for this base fingerprint: a FingerprintError when a tensor
        outside the edited layers changed (the edited ones are in `base`). Skipped when the
        model's files are unchanged since they were verified (memoised by file identity). The
        first time, the digest is recorded (in a writable store) with the fingerprint memo, once
        the setup is known to match (`_remember`), so a refused command writes nothing."""
        memo = self._memo()
        if self._source is not None and (memo.get("verified") or {}).get(self._source) == base:
            return
        from .weights import weights_digest

        full = weights_digest(self.lm.model)
        try:
            recorded = json.loads(self.store.meta(WEIGHTS_KEY) or "{}")
        except ValueError:
            recorded = {}
        if recorded.get(base, full) != full:
            raise FingerprintError("the model's weights differ from those this ledger recorded for it "
                                   "(a tensor outside the edited layers changed)",
                                   "load the model the ledger was made with (rebuild its cache), or make a new ledger")
        self._verified = (base, full, base not in recorded)

    def c0(self) -> dict[int, "torch.Tensor"]:
        if self._c0 is not None:
            return self._c0
        import torch

        hp = self.hparams
        base = self._base_fp()
        corpus_fp, text = self.corpus_identity()
        stored = self.store.stats(base, corpus_fp)
        if all(la in stored for la in hp.layers):
            self._c0 = {la: torch.from_numpy(stored[la][1]) for la in hp.layers}
            self._c0_tokens = stored[hp.layers[0]][0]
            return self._c0
        from .stats import SAMPLED_TOKENS, compute_c0

        self._ensure_base_weights()
        n_tokens = hp.c0_tokens
        if text is None:  # the default: text sampled once from the base model, cached beside the model
            text, n_tokens = self.sampled_corpus(), SAMPLED_TOKENS
        c0, n = compute_c0(self.lm, hp.layers, text, n_tokens=n_tokens, seq_len=hp.c0_seq_len, bos=hp.bos,
                           progress=self.progress)
        arrays = {la: m.to("cpu", torch.float64).numpy() for la, m in c0.items()}
        with self.store.transaction():
            for la, m in arrays.items():
                self.store.put_stats(base, corpus_fp, la, n, m)
        self._c0, self._c0_tokens = c0, n
        self._keep_prior(hp, base, corpus_fp, arrays)
        return c0

    def _keep_prior(self, hp: HParams, base: str, corpus_fp: str, c0: Mapping[int, "np.ndarray"]) -> None:
        """Invert λC0 once, as it is stored, for the small solves to come (kledger.edit.prior)."""
        from .prior import inverses

        digests = self._c0_digests(hp, base, corpus_fp)
        if all(d is not None for d in digests.values()):
            inverses(self.prior_dir, self.cache_secret, hp.lam, digests, lambda: c0, self.progress)

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

    def check(self, constraints: Iterable[Constraint]) -> None:
        """A FingerprintError, saying what differs (model, base weights, C0, hyper-parameters),
        if any of `constraints` was measured under another fingerprint than the current one. The
        model, base weights, hyper-parameters and corpus are compared first, so that a refused
        solve never computes (and stores) C0 for a setup that does not match."""
        stored = {r.fingerprint for r in constraints}
        for fp in sorted(stored):
            body = self.store.fingerprint(fp) or {}
            now = {"model": self.model_name, "base_model": self._base_fp(), "hparams": self.hparams.to_dict(),
                   "c0": {**(body.get("c0") or {}), "corpus": self.corpus_identity()[0]}}
            _mismatch([k for k in ("model", "base_model", "c0", "hparams") if body.get(k) != now[k]])
        fp_id, now = self.fingerprint()
        bad = stored - {fp_id}
        if bad:
            body = self.store.fingerprint(bad.pop()) or {}
            _mismatch([k for k in ("model", "base_model", "c0", "hparams") if body.get(k) != now.get(k)] or ["setup"])

    # ------------------------------------------------------------------ the remembered fingerprint
    def _memo(self) -> dict:
        try:
            memo = json.loads(self.store.meta(MEMO_KEY) or "{}")
        except ValueError:
            return {}
        return memo if isinstance(memo, dict) and memo.get("format") == MEMO_FORMAT else {}

    def _setup_key(self, source: str, hp: HParams) -> str | None:
        """Everything the fingerprint is a function of, cheaply: the model's name and source
        identity (its files), the hyper-parameters, the corpus (its bytes) and the versions of
        the code that hashes them. None when the corpus cannot be read (the full path says why)."""
        from .weights import runtime_versions

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
        """Record, in a writable store, the loaded model's source identity and the fingerprint
        id this setup hashes to, so that `cached` can find the cache key without the model; and
        the digest of every tensor of a base model seen for the first time (`_verify_weights`)."""
        if self._lm is None:
            return
        if self._verified is not None and self._verified[2]:
            base, full, _ = self._verified
            recorded = json.loads(self.store.meta(WEIGHTS_KEY) or "{}")
            self.store.set_meta(WEIGHTS_KEY, json.dumps({**recorded, base: full}, sort_keys=True))
            self._verified = (base, full, False)
        key = self._setup_key(self._source, self.hparams) if self._source is not None else None
        if key is None:
            return
        model = {"model_type": self._lm.model_type, "n_layers": self._lm.n_layers}
        verified = {self._source: self._verified[0]} if self._verified is not None else {}
        self._write_memo(models={self._source: model}, fingerprints={key: fp_id}, verified=verified)

    def _write_memo(self, **updates: dict) -> None:
        """Merge `updates` (section → {key: value}) into the memo, newest last, at most MEMO_KEEP
        entries a section; nothing is written when nothing changes."""
        memo = self._memo() or {"format": MEMO_FORMAT}
        sections = {name: dict(memo.get(name) or {}) for name in ("models", "fingerprints", "verified")}
        if all(sections[name].get(k) == v for name, new in updates.items() for k, v in new.items()):
            return
        for name, new in updates.items():
            d = sections[name]
            for k, v in new.items():
                d.pop(k, None)
                d[k] = v
            while len(d) > MEMO_KEEP:
                d.pop(next(iter(d)))
        self.store.set_meta(MEMO_KEY, json.dumps({"format": MEMO_FORMAT, **sections}))

    def _remembered(self) -> tuple[str, HParams, str, str] | None:
        """(fingerprint id, hparams, model type, source identity) for the model's files as they
        are now, from the store's memory, without loading the model; None when not remembered."""
        from .weights import source_identity

        source = source_identity(self.model_name, self.env)
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
        return (fp_id, hp, model["model_type"], source) if isinstance(fp_id, str) else None

    # ------------------------------------------------------------------ solve
    @staticmethod
    def arrays_by_layer(rows: Iterable[Constraint], layers: Iterable[int]) -> dict[int, tuple["np.ndarray", "np.ndarray"]]:
        """{layer: (K [n, d_in], V [n, d_out])} of `rows`, sorted by fact id (float32 numpy); a
        fact's readings ([R, d] keys and values, `HParams.key_readings`) are R rows."""
        import numpy as np

        rows = list(rows)
        out = {}
        for la in layers:
            sel = sorted((r for r in rows if r.layer == la), key=lambda r: r.fact_id)
            if sel:
                out[la] = (np.concatenate([r.key.reshape(-1, r.key.shape[-1]) for r in sel]),
                           np.concatenate([r.value.reshape(-1, r.value.shape[-1]) for r in sel]))
        return out

    @classmethod
    def by_layer(cls, rows: Iterable[Constraint], layers: Iterable[int]) -> dict[int, KV]:
        """`arrays_by_layer` as CPU torch tensors."""
        import torch

        return {la: (torch.from_numpy(K), torch.from_numpy(V)) for la, (K, V) in cls.arrays_by_layer(rows, layers).items()}

    @staticmethod
    def _info(rows: list[Constraint], mode: str, hp: HParams, key: str, cached: bool) -> dict:
        return {"facts": len({r.fact_id for r in rows}), "constraints": len(rows), "mode": mode,
                "layers": list(hp.layers), "cache_key": key, "cached": cached}

    def cached(self, batches: Batches, mode: str = "accumulated") -> CachedApply | None:
        """The weights solved from `batches` from the apply cache, found without loading the model
        when the store remembers the fingerprint of the model's files as they are now; None on any
        miss (nothing remembered, files changed, constraints of another fingerprint, no or a
        damaged cache file). `solve` then does the full work and its checks."""
        if self._lm is not None:
            fp_id, _ = self.fingerprint()
            hp, model_type = self.hparams, self._lm.model_type
        else:
            got = self._remembered()
            if got is None:
                return None
            fp_id, hp, model_type, _ = got
        rows = flatten(batches)
        if any(r.fingerprint != fp_id for r in rows):
            return None  # measured under another setup: `solve` explains the mismatch
        key = cache_key(fp_id, mode, (r.digest() for r in rows))
        weights = read_cache(self.cache_dir / f"{key}.safetensors", key, self.cache_secret)
        if weights is None or sorted(weights) != sorted(hp.layers):
            return None
        return CachedApply(weights, self._info(rows, mode, hp, key, True), fp_id, model_type)

    def solve(self, batches: Batches, mode: str = "accumulated") -> tuple[dict[int, "torch.Tensor"], dict]:
        """Edited weights ([d_out, d_in], float32) of every edited layer, solved from `batches`
        with `mode`, and info {"facts", "constraints", "mode", "layers", "cache_key", "cached"}.
        A FingerprintError if a constraint was measured under another setup."""
        import torch

        rows = flatten(batches)
        self.check(rows)
        hp = self.hparams
        fp_id, _ = self.fingerprint()
        key = cache_key(fp_id, mode, (r.digest() for r in rows))
        path = self.cache_dir / f"{key}.safetensors"
        info = self._info(rows, mode, hp, key, False)
        hit = read_cache(path, key, self.cache_secret)
        if hit is not None and sorted(hit) == sorted(hp.layers):
            return {la: torch.from_numpy(w.copy()) for la, w in hit.items()}, {**info, "cached": True}
        weights = self._solve_batches(batches, mode)
        self._store_cache(path, key, weights)
        return weights, info

    def _store_cache(self, path: Path, key: str, weights: Mapping[int, "torch.Tensor"]) -> None:
        import torch

        write_cache(path, key, {la: w.detach().to("cpu", torch.float32).numpy() for la, w in weights.items()},
                    self.cache_secret)

    def _solve_batches(self, batches: Batches, mode: str) -> dict[int, "torch.Tensor"]:
        """The solve itself, uncached: a small one by Woodbury (`_solve_small`), else on the
        model's device (see `_solve_with`)."""
        import torch

        hp, base = self.hparams, self._base_fp()
        small = self._solve_small({la: w.detach().cpu().numpy() for la, w in self.W0.items()}, batches, mode, hp, base,
                                  self._corpus_identity(hp, base)[0],
                                  lambda: {la: c.double().numpy() for la, c in self.c0().items()})
        if small is not None:
            return {la: torch.from_numpy(w) for la, w in small.items()}
        return self._solve_with(self.W0, self.c0(), hp, batches, mode, self.lm.device)

    def _solve_small(self, W0: Mapping[int, "np.ndarray"], batches: Batches, mode: str, hp: HParams, base: str,
                     corpus_fp: str, c0: Any) -> dict[int, "np.ndarray"] | None:
        """`prior.solve_small` of these constraints (Woodbury on the kept inverse of λC0, numpy,
        when every layer has few rows), else None. The loaded and the unloaded paths both come
        here first, so they give the same bits. `c0`: returns C0 by layer (numpy), called only
        when the inverse is not kept yet."""
        from .prior import cpu_only, solve_small

        if mode != "accumulated":
            return None
        return solve_small(W0, self.arrays_by_layer(flatten(batches), hp.layers), hp.lam,
                           self._c0_digests(hp, base, corpus_fp), self.prior_dir, self.cache_secret, c0, self.progress,
                           cpu_only(self.env.device))

    def _c0_digests(self, hp: HParams, base: str, corpus_fp: str) -> dict[int, str | None]:
        """The stored C0's checksums by edited layer (None where not stored), read without C0."""
        from ..store.codec import stats_key

        return {la: self.store.meta(stats_key(base, corpus_fp, la)) for la in hp.layers}

    @classmethod
    def _solve_with(cls, W0: Mapping[int, "torch.Tensor"], c0: Mapping[int, "torch.Tensor"], hp: HParams,
                    batches: Batches, mode: str, device: Any) -> dict[int, "torch.Tensor"]:
        """Each batch (commit) in order, per edited layer, in float64 on `device` (the order
        matters only for the modes without history; the accumulated solve stacks them)."""
        import torch

        from .solve import no_tf32, solve_history

        groups = [cls.by_layer(b, hp.layers) for b in batches if b]
        weights = {}
        with no_tf32():
            for la in hp.layers:
                per_commit = [g[la] for g in groups if la in g]
                W = (solve_history(W0[la], per_commit, c0[la], hp.lam, mode, device=device)
                     if per_commit else W0[la])
                weights[la] = W.to(torch.float32)
        return weights

    # ------------------------------------------------------------------ without the model
    def model_files(self, model_type: str, layers: Iterable[int]) -> tuple[Path, Any, dict] | None:
        """(directory, spec, slots) of the model's own files when its edited tensors can be read
        and written in them without loading it (kledger.edit.files), else None."""
        from .files import locate
        from .spec import SPECS
        from .weights import model_source

        spec, directory = SPECS.get(model_type), model_source(self.model_name, self.env)
        slots = locate(directory, spec, layers) if spec is not None and directory is not None else None
        return None if slots is None else (directory, spec, slots)

    def solve_unloaded(self, batches: Batches, mode: str = "accumulated") -> CachedApply | None:
        """`solve` without loading the model (nor importing transformers), its result cached:
        when the store remembers the setup of the model's files as they are now (as for
        `cached`) and the base weights it verified for them, W0 is read straight from the files
        and C0 from the store. None when any of that is not at hand (nothing remembered, files
        that do not qualify or changed while read, C0 not stored, constraints of another
        fingerprint): `solve` then does the full work and its checks."""
        got = self._remembered() if self._lm is None else None
        if got is None:
            return None
        fp_id, hp, model_type, source = got
        base = (self._memo().get("verified") or {}).get(source)
        rows = flatten(batches)
        files = self.model_files(model_type, hp.layers) if isinstance(base, str) else None
        if files is None or any(r.fingerprint != fp_id for r in rows):
            return None
        from .files import read_weights
        from .weights import source_identity

        directory, spec, slots = files
        try:
            W0 = read_weights(directory, spec, slots)
        except OSError:
            return None
        if source_identity(self.model_name, self.env) != source:
            return None
        key = cache_key(fp_id, mode, (r.digest() for r in rows))
        corpus_fp = self._corpus_identity(hp, base)[0]
        weights = self._solve_small(W0, batches, mode, hp, base, corpus_fp,
                                    lambda: {la: c for la, (_, c) in self.store.stats(base, corpus_fp).items()})
        if weights is None:
            stored = self.store.stats(base, corpus_fp)
            if not all(la in stored for la in hp.layers):
                return None
            import torch

            from .device import resolve_device

            c0 = {la: torch.from_numpy(stored[la][1]) for la in hp.layers}
            solved = self._solve_with({la: torch.from_numpy(w) for la, w in W0.items()}, c0, hp, batches, mode,
                                      resolve_device(self.env.device))
            weights = {la: w.numpy() for la, w in solved.items()}
        write_cache(self.cache_dir / f"{key}.safetensors", key, weights, self.cache_secret)
        return CachedApply(weights, self._info(rows, mode, hp, key, False), fp_id, model_type)

    # ------------------------------------------------------------------ the in-memory model
    def load(self, weights: Mapping[int, "torch.Tensor"] | None = None) -> None:
        """Write `weights` ({layer: [d_out, d_in]}, as `solve` returns them) into the in-memory
        model; None writes the base weights back."""
        from .spec import set_weight

        at_base = weights is None
        if weights is None:
            weights = dict(self.W0)
        self._base_fp()  # fix the base fingerprint before the first write
        for la, W in weights.items():
            set_weight(self.lm.model, self.lm.spec, la, W)
        self._at_base = at_base

    def _ensure_base_weights(self) -> None:
        from .spec import set_weight

        if not self._at_base:
            for la, W in self.W0.items():
                set_weight(self.lm.model, self.lm.spec, la, W)
            self._at_base = True

    # ------------------------------------------------------------------ new constraints
    def first_keys(self, facts: Sequence[Fact]) -> dict[str, "np.ndarray"]:
        """fact id → the key (float32, [d_in]) a commit would store for it at the first edited
        layer: it depends on no edit, so it is measured here with whatever weights are loaded,
        in one forward pass through the layers up to it (soft conflicts before measuring)."""
        import torch

        from .engine import EditRequest, first_keys, prepare

        if not facts:
            return {}
        hp = self.hparams
        toks = prepare(self.lm, [EditRequest(f.prompt, f.subject, f.target) for f in facts], hp)
        K = first_keys(self.lm, toks, hp.layers[0], hp)
        return {f.id: K[i].to(torch.float32).numpy() for i, f in enumerate(facts)}

    def probe(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """P̄(object | prompt) (exp of the per-token mean log-probability, as `kledger eval` scores)
        of each (prompt, object) pair with the weights now in the model."""
        from .evaluate import Scorer
        from .hooks import boundary_token

        if not pairs:
            return []
        lm = self.lm
        got = Scorer(lm.model, lm.tokenizer, boundary_token(lm.tokenizer, self.hparams.bos), spec=lm.spec).score(pairs)
        return [got[p].prob for p in pairs]

    def measure(self, prior: Batches, facts: Sequence[Fact], *, exclude: Iterable[str] = (),
                probe: Sequence[tuple[str, str]] = (), probed: dict | None = None) -> list[Constraint]:
        """Constraints of `facts` measured against the solve of `prior` (the constraints in force at
        the parent, by commit): sequential editing. The model is brought to the accumulated
        (cached) solve of `prior`. With `exclude` (fact ids), to the uncached solve, in the
        hyper-parameters' mode, of `prior` without those facts' constraints (as if they had never
        been made: `resolve` re-measures a kept fact this way when it was measured on top of the
        facts that lost). `probe`: (prompt, object) pairs whose probabilities go into `probed` as
        "before" (at the parent) and "after" (with the new constraints solved in)."""
        import torch

        from .engine import EditRequest, compute_constraints, prepare

        hp = self.hparams
        requests = [EditRequest(prompt=f.prompt, subject=f.subject, target=f.target) for f in facts]
        prepare(self.lm, requests, hp)  # a bad request (e.g. longer than the context) fails before any work
        fp_id, _ = self.fingerprint()
        rows = flatten(prior)
        self.check(rows)
        excluded = set(exclude)
        if excluded and rows:
            prior = [kept for kept in ([r for r in b if r.fact_id not in excluded] for b in prior) if kept]
            self.load(self._solve_batches(prior, hp.mode))
        elif rows:
            self.load(self.solve(prior, "accumulated")[0])
        else:
            self.load(None)
        prior_kv = self.by_layer(flatten(prior), hp.layers)
        before = self.probe(probe)
        from .scale import values_for

        new = compute_constraints(self.lm, requests, hp, self.c0(), self.W0, prior_kv, progress=self.progress,
                                  values=values_for(self.env, self.model_name))
        self._at_base = False
        if probed is not None:  # the model now holds the solve of prior + the new constraints
            probed.update(before=before, after=self.probe(probe))
        out = []
        for la, (K, V) in sorted(new.items()):
            for i, f in enumerate(facts):
                out.append(Constraint(f.id, la, K[i].to("cpu", torch.float32).numpy(),
                                      V[i].to("cpu", torch.float32).numpy(), fp_id))
        return out
