"""Edit hyper-parameters: one frozen record, hashed into every stored constraint's fingerprint.
Pure: no torch."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..errors import InputError

SAMPLED_TOKENS = 20_000  # size of the default, model-sampled C0 corpus (sampling is the slow part)


def corpus_fingerprint(text: str, n_tokens: int) -> str:
    """SHA-256 of the corpus text and the number of tokens C0 was measured on."""
    h = hashlib.sha256(b"corpus\0")
    h.update(text.encode("utf-8"))
    h.update(f"\0{int(n_tokens)}".encode())
    return h.hexdigest()


def _finite_at_least(value: Any, low: float, strict: bool = False) -> bool:
    """Whether float(value) is finite and at least `low` (above it with `strict`); False for nan
    and for an integer too large for a float."""
    try:
        x = float(value)
    except OverflowError:
        return False
    return (x > low if strict else x >= low) and x < math.inf


BOS_MODES = ("auto", "always", "never")
# fields added after the first release, with the value that behaves as kledger did before them
LATER_FIELDS: dict[str, Any] = {"spread_passes": 1, "c0_sampler": 1, "bare_key_weight": 0.0,
                                "value_dtype": "float32", "key_readings": 1, "step_norm": 0.0}
VALUE_DTYPES = ("float32", "bfloat16", "auto")


@dataclass(frozen=True)
class HParams:
    layers: tuple[int, ...] = (3, 4, 5, 6, 7)  # edited layers (MLP down-projections), ascending
    lam: float = 3000.0  # λ, the weight of C0 (a per-token mean second moment)
    mode: str = "accumulated"  # solver mode, see kledger.edit.solve.MODES
    # value optimisation
    steps: int = 25  # value-optimisation steps at most
    lr: float = 0.5
    # 0: Adam steps with learning rate lr; > 0: plain gradient steps of this length relative to
    # ‖h‖ (the unedited residual's norm), along the negative gradient (lr unused)
    step_norm: float = 0.0
    clamp: float = 0.75  # ‖δ‖ ≤ clamp · ‖h‖ at the last edited layer
    kl_weight: float = 0.0625
    weight_decay: float = 0.0  # L2 on δ/‖h‖ (MEMIT's v_weight_decay); 0 = only the clamp
    early_stop_prob: float = 0.9  # stop when every fact's mean target probability exceeds it
    # the precision of the value optimisation's linear layers above the last edited layer (the
    # layers at and below it, which give the residual the value starts from, stay float32); auto:
    # bfloat16 where the device has fast bfloat16 products (a GPU that supports it, a CPU with
    # AMX units), else float32 (kledger.edit.values.value_dtype_on)
    value_dtype: str = "float32"
    # contexts for keys and values
    n_prefixes: int = 5  # seeded short prefix contexts besides the bare prompt
    prefix_len: int = 8  # tokens per generated prefix
    # a key is the mean over the contexts (0), or this weight on the bare prompt's key and the
    # rest on the prefixed contexts' mean
    bare_key_weight: float = 0.0
    # constraints per fact and layer: 1, one key (as above) and its value; 2, one for the bare
    # prompt's key and one for the prefixed contexts' mean key, each with the value that moves its
    # own reading's residual by the optimised δ (each reading edited where it is read; the
    # stored key and value of a fact are then [2, d] rows)
    key_readings: int = 1
    seed: int = 0
    bos: str = "auto"  # prepend a document-boundary token: auto (if the tokenizer adds none), always, never
    # C0
    c0_tokens: int = 100_000
    c0_seq_len: int = 128
    c0_sampler: int = 1  # how the default corpus is sampled from the model (kledger.edit.stats.SAMPLERS)
    # spreading: passes over the edited layers; each pass after the first pushes every new value
    # out by the residual still missing at the last edited layer (the λC0 solve lands only part of
    # a value), so the edit lands as optimised
    spread_passes: int = 1

    def __post_init__(self) -> None:
        layers = tuple(int(x) for x in self.layers)
        object.__setattr__(self, "layers", layers)
        if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0:
            raise InputError(f"layers must be distinct, ascending and non-negative, got {list(layers)}",
                             "e.g. --layers 3,4,5,6,7")
        if self.value_dtype not in VALUE_DTYPES:
            raise InputError(f"value_dtype must be one of {', '.join(VALUE_DTYPES)}, got {self.value_dtype!r}",
                             "e.g. --set value_dtype=bfloat16")
        if self.bos not in BOS_MODES:
            raise InputError(f"bos must be one of {', '.join(BOS_MODES)}, got {self.bos!r}")
        for name in ("lam", "lr", "clamp"):
            if not _finite_at_least(getattr(self, name), 0.0, strict=True):
                raise InputError(f"{name} must be a positive, finite number, got {str(getattr(self, name))[:20]}",
                                 f"e.g. --set {name}=5000")
        if type(self.c0_sampler) is not int or self.c0_sampler not in (1, 2):
            raise InputError(f"c0_sampler must be 1 or 2, got {self.c0_sampler!r}", "e.g. --set c0_sampler=2")
        sn = self.step_norm
        if isinstance(sn, bool) or not isinstance(sn, (int, float)) or not _finite_at_least(sn, 0.0):
            raise InputError(f"step_norm must be 0 (Adam) or a positive, finite number, got {str(sn)[:20]}",
                             "e.g. --set step_norm=0.3")
        if self.steps < 1 or self.n_prefixes < 0 or self.prefix_len < 1 or self.c0_tokens < 1 or self.spread_passes < 1:
            raise InputError("steps, prefix_len, c0_tokens and spread_passes must be >= 1 and n_prefixes >= 0")
        if not 0 <= self.bare_key_weight < 1:
            raise InputError(f"bare_key_weight must be at least 0 and below 1, got {self.bare_key_weight!r}",
                             "e.g. --set bare_key_weight=0.5")
        if type(self.key_readings) is not int or self.key_readings not in (1, 2):
            raise InputError(f"key_readings must be 1 or 2, got {self.key_readings!r}", "e.g. --set key_readings=2")
        if self.key_readings == 2 and (self.n_prefixes < 1 or self.bare_key_weight):
            raise InputError("key_readings=2 needs prefixed contexts and no bare_key_weight (its keys are the bare "
                             "prompt's and the prefixed contexts' mean)", "set n_prefixes >= 1 and bare_key_weight=0")

    def to_dict(self) -> dict[str, Any]:
        """All fields, except those added after the first release while they hold the value that
        means "as before" (LATER_FIELDS): fingerprints made before a field existed stay valid."""
        d = asdict(self)
        d["layers"] = list(self.layers)
        for name, neutral in LATER_FIELDS.items():
            if d[name] == neutral:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HParams":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown hyper-parameters: {', '.join(unknown)}",
                             f"known: {', '.join(sorted(known))}")
        d = dict(d)
        if "layers" in d:
            d["layers"] = tuple(d["layers"])
        return cls(**d)

    def with_(self, **changes: Any) -> "HParams":
        return replace(self, **changes)

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of all fields."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(("hparams\0" + text).encode()).hexdigest()


def default_layers(n_layers: int) -> tuple[int, ...]:
    """Five consecutive layers starting at about a tenth of the depth (3–7 of SmolLM2's 30, in the
    MEMIT range for GPT-J's 28 layers: 3–8); fewer for very shallow models."""
    if n_layers <= 2:
        return tuple(range(n_layers))
    start = max(1, round(n_layers / 10))
    width = min(5, n_layers - start - 1) if n_layers > 3 else n_layers - start
    return tuple(range(start, start + max(1, width)))


# Default hyper-parameters come in versions. A ledger records the version it was made with
# (meta `defaults_version`; none recorded: version 1), so that new defaults never change the
# fingerprint of constraints an existing ledger stored.
DEFAULTS_VERSION = 3

# Version 1: the first defaults. Per model type, measured on this project's machine: Llama
# (SmolLM2-135M-Instruct, layers 3-7, CounterFact train records 0-9 in one batch, C0 on 50k
# WikiText-2 tokens): lr 1.0 and 0.5 score the same (efficacy 90, generalization 70, specificity
# 80 = before) but 1.0 stops after 11 steps, 0.5 after 17; λ 1,500-5,000 score the same, 15,000 is
# too stiff (efficacy 70).
#
# Version 2 (2026-11-30): chosen the way the ledger is used, 300 CounterFact train records edited
# in 30 sequential commits of 10 per setting (bench/sweep.py; table and rule in docs/editing.md):
# the highest efficacy + generalization among the settings whose specificity stayed within 3
# points of the base model's was λ 1,500 (98.0 / 92.7 / 66.3 against 97.3 / 88.3 / 66.7 for
# version 1, base specificity 69.3). Measured on SmolLM2 only, so only Llama-type models change.
#
# Version 3 (2026-11-30): the edit settings of version 2; the default corpus for C0 is drawn by
# corpus sampler 2 (a cached loop with a partial sort, kledger.edit.stats._sample_fast): the same
# kind of text, several times faster to make, but other text, hence a new version.
_GENERIC: dict[int, dict[str, Any]] = {1: {}, 2: {}, 3: {"c0_sampler": 2}}
_PER_TYPE: dict[int, dict[str, dict[str, Any]]] = {
    1: {"llama": {"lam": 3000.0, "lr": 1.0}},
    2: {"llama": {"lam": 1500.0, "lr": 1.0}},
    3: {"llama": {"lam": 1500.0, "lr": 1.0}},
}


def defaults_for(model_type: str, n_layers: int, version: int = DEFAULTS_VERSION) -> HParams:
    """Default hyper-parameters (of defaults `version`) for a model of `model_type` with
    `n_layers` decoder layers."""
    if version not in _GENERIC:
        raise InputError(f"unknown hyper-parameter defaults version {version}",
                         f"this kledger knows versions {', '.join(map(str, sorted(_GENERIC)))}: upgrade kledger")
    over = {**_GENERIC[version], **_PER_TYPE[version].get(model_type, {})}
    layers = over.pop("layers", None)
    if callable(layers):
        layers = layers(n_layers)
    return HParams(layers=layers or default_layers(n_layers), **over)
