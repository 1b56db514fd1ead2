"""Edits as a PEFT LoRA adapter (`kledger apply --lora DIR`): per edited layer the change
ΔW = W − W0 of the down-projection, from a float64 SVD ΔW = U S Vᵀ, as lora_B = U_r √S_r and
lora_A = √S_r V_rᵀ, with lora_alpha = r so that PEFT's scaling (lora_alpha / r) is 1 and
W0 + B A = W (to the float32 rounding of the stored weights). The rank r is one for all layers: by
default the largest rank that any layer's change has (at most the number of constraint rows,
facts × key readings; singular values at the level of float32 rounding are not counted; a layer
of lower rank is padded with zero columns, which changes nothing), else `rank`, truncating where a change needs more; the
share of each layer's change kept (Σ S_r² over the sum for the exact rank, its "energy") is
reported. numpy and safetensors
only: writing an adapter needs neither torch nor peft (loading it needs peft).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from .spec import ArchSpec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RANK_TOL = 1e-10  # singular values below this share of the largest are round-off: not part of the change


def factors(weights: Mapping[int, "np.ndarray"], base: Mapping[int, "np.ndarray"],
            rank: int | None) -> tuple[int, dict[int, tuple["np.ndarray", "np.ndarray"]], dict[int, float], dict[int, int]]:
    """(r, {layer: (A [r, d_in], B [d_out, r])}, {layer: energy kept}, {layer: exact rank}) of the
    changes weights − base (canonical [d_out, d_in]). A layer's exact rank counts the singular values
    above the rounding of float32 weights; its energy is the share of the squares of those kept."""
    import numpy as np

    svds, exact = {}, {}
    for la in sorted(weights):
        W = np.asarray(weights[la], dtype=np.float64)
        delta = W - np.asarray(base[la], dtype=np.float64)
        U, S, Vt = np.linalg.svd(delta, full_matrices=False)
        # the solved weights are stored in float32: their rounding is a change of full rank, each
        # entry at most half an ulp of the largest; a random matrix of such entries has a spectral
        # norm of about that times (√d_out + √d_in). Below it a direction is not an edit.
        noise = 2.0 ** -24 * float(np.abs(W).max(initial=0.0)) * (W.shape[0] ** 0.5 + W.shape[1] ** 0.5)
        exact[la] = int((S > max(RANK_TOL * (S[0] if S.size else 0.0), noise)).sum())
        svds[la] = (U, S, Vt)
    r = rank if rank is not None else max([1, *exact.values()])
    if r < 1:
        raise UsageError(f"--rank must be at least 1, got {r}", "e.g. --rank 16, or leave it out for the exact rank")
    out, energy = {}, {}
    for la, (U, S, Vt) in svds.items():
        k = min(r, S.size)
        root = np.sqrt(S[:k])
        A = np.zeros((r, Vt.shape[1]))
        B = np.zeros((U.shape[0], r))
        A[:k] = root[:, None] * Vt[:k]
        B[:, :k] = U[:, :k] * root[None, :]
        total = float((S[:exact[la]] ** 2).sum())  # the edit's energy, without the rounding's
        energy[la] = 1.0 if total == 0 or k >= exact[la] else float((S[:k] ** 2).sum() / total)
        out[la] = (A.astype(np.float32), B.astype(np.float32))
    return r, out, energy, exact


def fill_adapter(dest: Path, parts: Mapping[int, tuple["np.ndarray", "np.ndarray"]], r: int, spec: "ArchSpec",
                 base_model: str) -> None:
    """Write adapter_config.json and adapter_model.safetensors into `dest`, as PEFT saves a LoRA
    adapter of a causal LM."""
    import numpy as np
    from safetensors.numpy import save_file

    tensors = {}
    for la, (A, B) in parts.items():
        prefix = f"base_model.model.{spec.layers}.{la}.{spec.down_proj}"
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(A)
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(B)
    save_file(tensors, str(dest / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
        "target_modules": [spec.down_proj],  # "mlp.down_proj": a suffix match, not every "down_proj"
        "layers_to_transform": sorted(int(la) for la in parts), "layers_pattern": spec.layers.rsplit(".", 1)[-1],
        "fan_in_fan_out": spec.layout == "in_out", "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    (dest / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")


def save_adapter(out_dir: Path, weights: Mapping[int, "np.ndarray"], base: Mapping[int, "np.ndarray"],
                 spec: "ArchSpec", base_model: str, rank: int | None, *, meta: Mapping[str, Any] | None = None,
                 force: bool = False, before_rename: Any = None) -> dict:
    """Write the adapter directory whole or not at all (as `--out`: kledger.edit.weights), and
    return what `apply` reports of it: path, rank, energy kept per layer, exact rank per layer."""
    from .weights import write_model_dir

    r, parts, energy, exact = factors(weights, base, rank)
    path = write_model_dir(out_dir, lambda tmp: fill_adapter(tmp, parts, r, spec, base_model),
                           {**dict(meta or {}), "lora_rank": r}, force, before_rename)
    return {"lora": str(path), "lora_rank": r, "lora_energy": {str(la): e for la, e in energy.items()},
            "lora_exact_rank": {str(la): n for la, n in exact.items()}}
