"""Small revisions solved without factorising a d × d matrix: the Woodbury identity on the inverse
of the prior.

The accumulated solve of a layer (kledger.edit.solve.solve_layer) is W = W0 + ΔW with
ΔWᵀ = (λC0 + KᵀK)⁻¹ Kᵀ R and R = V − K W0ᵀ, for K [n, d_in] the keys of the n constraint rows in
force. With the prior's inverse M = (λC0)⁻¹ at hand, the same change is

    ΔWᵀ = M Kᵀ (I + K M Kᵀ)⁻¹ R,

which costs O(n d²) products and an n × n solve instead of a d × d factorisation: for a revision of
a few facts, milliseconds instead of most of a second per layer. M is a pure function of the
stored C0 and λ; it is computed once, with numpy, and kept on disk beside the apply cache, keyed
by the stored C0's checksums and λ and signed with the ledger's secret like the apply cache
(kledger.edit.cache). A layer is solved this way when it has at most a quarter as many rows as
its key width, or two thirds where the solve runs on the CPU anyway (`small`, `cpu_only`); the
direct solve is cheaper beyond that. The loaded and the unloaded `apply` both take this path for
the same constraints, on the CPU with numpy, so they give the same bits, and the unloaded one
needs no torch for it.

M is refused (None: the direct solve is used) when λC0 is too ill-conditioned for its inverse to
be trusted: when λC0 M differs from the identity by more than `INVERSE_TOLERANCE` anywhere; the
refusal is kept like M. M is computed only from a C0 whose bytes have the stored checksums, and
only for a ledger with a secret. numpy and safetensors only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from ..records import canonical_json, sha256_hex
from ..settings import Progress, report
from .cache import read_cache, write_cache

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

PRIOR_FORMAT = "kledger-prior-inverse/1"
INVERSE_TOLERANCE = 1e-11  # max |λC0 M − I| for M to be used (the default model's C0: 5e-15 to 5e-13)


def small(rows: int, d_in: int, cpu: bool = False) -> bool:
    """Whether a layer with `rows` constraint rows of key width `d_in` is solved by Woodbury: up
    to a quarter of `d_in` rows anywhere (milliseconds: not worth a GPU), and up to two thirds of
    it when the solve would run on the CPU anyway (`cpu`, see `cpu_only`), where Woodbury's
    products cost no more than the direct factorisation (on one thread of this project's 2-core
    machine: 0.25 s against 0.26 s a layer at 1,001 rows of 1,536) and need no torch."""
    return 0 < rows and (4 * rows <= d_in or (cpu and 3 * rows <= 2 * d_in))


def cpu_only(device: str | None) -> bool:
    """Whether the solve runs on the CPU for the device setting `device` (kledger.settings), known
    without importing torch: "cpu", or "auto" on a machine where no CUDA driver library loads.
    A machine with a driver counts as not CPU-only even when torch cannot use it; the rule only
    has to give the loaded and the unloaded `apply` the same answer."""
    name = (device or "auto").strip().lower()
    if name == "cpu":
        return True
    if name != "auto":
        return False
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return True
    return False


def prior_key(digests: Mapping[int, str], lam: float) -> str:
    """The key of M for the stored C0 matrices with these checksums (by layer) and λ."""
    return sha256_hex(canonical_json([PRIOR_FORMAT, {str(int(la)): d for la, d in sorted(digests.items())},
                                      repr(float(lam))]))


def invert(c0: "np.ndarray", lam: float) -> "np.ndarray | None":
    """M = (λC0)⁻¹ (float64, symmetrised), or None when λC0 is too ill-conditioned to trust it."""
    import numpy as np

    A = lam * np.asarray(c0, dtype=np.float64)
    try:
        M = np.linalg.inv(A)
    except np.linalg.LinAlgError:
        return None
    M = (M + M.T) / 2
    if not np.isfinite(M).all() or np.abs(A @ M - np.eye(A.shape[0])).max() > INVERSE_TOLERANCE:
        return None
    return M


def woodbury(W0: "np.ndarray", K: "np.ndarray", V: "np.ndarray", M: "np.ndarray") -> "np.ndarray":
    """The accumulated solve's weight [d_out, d_in] (float64) for keys K [n, d_in] and values
    V [n, d_out], from M = (λC0)⁻¹."""
    import numpy as np

    # C-ordered copies: the same BLAS route whatever layout the caller's arrays have (a loaded
    # model's transposed view or a file's), so both `apply` paths give the same bits
    W0, K, V = (np.ascontiguousarray(a, dtype=np.float64) for a in (W0, K, V))
    R = V - K @ W0.T  # [n, d_out]
    MK = M @ K.T  # [d_in, n]
    S = np.eye(K.shape[0]) + K @ MK  # [n, n], symmetric positive definite
    return W0 + (MK @ np.linalg.solve(S, R)).T


def inverses(cache_dir: Path, secret: str | None, lam: float, digests: Mapping[int, str],
             c0: Callable[[], Mapping[int, "np.ndarray"]], progress: Progress | None = None) -> dict[int, "np.ndarray"] | None:
    """M by layer for the stored C0 with these checksums (by layer) and λ: read from `cache_dir`
    when written there before (checked with the ledger's secret), else computed from `c0()` and
    written there. None when C0 as `c0()` gives it does not have these checksums (changed since,
    or not stored yet) or any layer's λC0 cannot be trusted inverted (see `invert`; remembered
    in the same file, as empty arrays): the caller then solves directly. Without a secret
    nothing is kept, and nothing is computed either (it would be computed at every solve)."""
    import numpy as np

    from ..records import blob_digest
    from ..store.codec import encode

    if secret is None:
        return None
    key = prior_key(digests, lam)
    path = cache_dir / f"{key}.safetensors"
    got = read_cache(path, key, secret, fmt=PRIOR_FORMAT, dtype="<f8")
    if got is not None and sorted(got) == sorted(digests):
        return None if any(m.size == 0 for m in got.values()) else got
    mats = c0()
    if any(mats.get(la) is None or blob_digest(encode(mats[la], "<f8")[2]) != d for la, d in digests.items()):
        return None
    out = {}
    for i, la in enumerate(sorted(digests)):
        report(progress, "invert C0", i, len(digests))
        out[la] = invert(mats[la], lam)
        if out[la] is None:
            break
    report(progress, "invert C0", len(digests), len(digests))
    usable = all(m is not None for m in out.values()) and len(out) == len(digests)
    kept = out if usable else {la: np.zeros(0) for la in digests}
    try:
        write_cache(path, key, kept, secret, fmt=PRIOR_FORMAT, dtype="<f8")
    except Exception:  # noqa: BLE001 - a folder kledger cannot write, a full disk: computed again next time
        pass
    return out if usable else None


def solve_small(W0: Mapping[int, "np.ndarray"], kv: Mapping[int, tuple["np.ndarray", "np.ndarray"]], lam: float,
                digests: Mapping[int, str | None], cache_dir: Path, secret: str | None,
                c0: Callable[[], Mapping[int, "np.ndarray"]], progress: Progress | None = None,
                cpu: bool = False) -> dict[int, "np.ndarray"] | None:
    """The accumulated solve ({layer: float32 [d_out, d_in]}) of the rows `kv` ({layer: (K, V)})
    by `woodbury`, for every layer in `digests` (a layer without rows keeps W0); None when a
    layer has too many rows for it (`small`, with `cpu`), C0 is not stored (a checksum is None)
    or λC0 cannot be trusted inverted: the caller then solves directly."""
    import numpy as np

    if not kv or not all(small(K.shape[0], K.shape[1], cpu) for K, _ in kv.values()):
        return None
    if any(d is None for d in digests.values()):
        return None
    M = inverses(cache_dir, secret, lam, digests, c0, progress)  # type: ignore[arg-type]
    if M is None:
        return None
    return {la: (woodbury(W0[la], *kv[la], M[la]) if la in kv else np.asarray(W0[la])).astype(np.float32)
            for la in digests}
