"""The apply cache: solved weights on disk, keyed by what they are a pure function of.

The key is the fingerprint id (base model, C0, hyper-parameters), the solver mode and the sorted
digests of the constraints solved. Each entry is a safetensors file of [d_out, d_in] float32
arrays by layer, with the key and a MAC of the key and the tensors in its metadata. The MAC is
keyed with the ledger's own secret (kept in its database), so an entry forged or edited outside
kledger, checksum recomputed or not, fails the check; a failing entry is deleted and solved
again. numpy and safetensors only: a cached `kledger apply` needs no torch.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from ..records import canonical_json, sha256_hex

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

CACHE_FORMAT = "kledger-apply-cache/2"


def cache_key(fp_id: str, mode: str, digests: Iterable[str]) -> str:
    """The key of the weights solved with `mode` from the constraints with these digests."""
    return sha256_hex(canonical_json([fp_id, mode, sorted(digests)]))


def _weights_mac(weights: Mapping[int, "np.ndarray"], key: str, secret: str, fmt: str = CACHE_FORMAT,
                 dtype: str = "<f4") -> str:
    """HMAC-SHA256, under the ledger's secret, of the format, the key and the tensors."""
    import hmac

    import numpy as np

    h = hmac.new(secret.encode(), f"{fmt}\0{key}\0".encode(), hashlib.sha256)
    for la in sorted(weights):
        a = np.ascontiguousarray(weights[la], dtype=dtype)
        h.update(f"{int(la)} {tuple(a.shape)}\0".encode())
        h.update(a.data)
    return h.hexdigest()


def read_cache(path: Path, key: str, secret: str | None, *, fmt: str = CACHE_FORMAT,
               dtype: str = "<f4") -> dict[int, "np.ndarray"] | None:
    """The weights cached under `key` ([d_out, d_in] float32 numpy arrays by layer), or None. A
    file that is unreadable, of another format or key, or whose tensors fail the MAC stored with
    them, is deleted (it is recomputed). No secret (a ledger that cannot store one): no cache.
    `fmt` and `dtype`: another kind of entry kept the same way (kledger.edit.prior)."""
    if secret is None or not path.is_file():
        return None
    import hmac

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            weights = {int(name): f.get_tensor(name) for name in f.keys()}
        if (meta.get("format") == fmt and meta.get("key") == key and weights
                and all(w.dtype.str == dtype for w in weights.values())
                and hmac.compare_digest(meta.get("mac", ""), _weights_mac(weights, key, secret, fmt, dtype))):
            return weights
    except Exception:  # noqa: BLE001 - any damage means: not a usable cache entry
        pass
    try:
        path.unlink(missing_ok=True)
    except OSError:  # a folder kledger cannot write: the entry is just not used
        pass
    return None


def write_cache(path: Path, key: str, weights: Mapping[int, "np.ndarray"], secret: str | None, *,
                fmt: str = CACHE_FORMAT, dtype: str = "<f4") -> None:
    """Write atomically, with the key and the MAC of the tensors in the file's metadata (nothing
    without a secret)."""
    if secret is None:
        return
    import numpy as np
    from safetensors.numpy import save_file

    arrays = {str(int(la)): np.ascontiguousarray(w, dtype=dtype) for la, w in weights.items()}
    meta = {"format": fmt, "key": key, "mac": _weights_mac({int(k): v for k, v in arrays.items()}, key, secret, fmt, dtype)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        save_file(arrays, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class CachedApply:
    """A cache hit found without the model: the weights and what `Editor.solve` would report."""

    weights: dict[int, "np.ndarray"]  # [d_out, d_in] float32 by layer
    info: dict
    fingerprint: str
    model_type: str

    def spec(self):
        from types import SimpleNamespace

        from .spec import spec_for

        return spec_for(SimpleNamespace(model_type=self.model_type))
