"""The store's byte codec and row decoding: vectors and C0 matrices to and from the bytes DuckDB
keeps, and table rows to records. Only kledger.store uses it."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..errors import IntegrityError
from ..records import Constraint, Fact

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

DTYPES = {"float32": "<f4", "float64": "<f8"}


def stats_key(model_fp: str, corpus_fp: str, layer: int) -> str:
    """The meta key of a stored C0 matrix's checksum (C0 is not covered by any commit's hash)."""
    return f"stats_sha256:{model_fp}:{corpus_fp}:{int(layer)}"


def encode(array: Any, dtype: str = "<f4") -> tuple[str, int, bytes]:
    """The one byte codec: (dtype name, element count, little-endian bytes) of a numpy array or
    a CPU tensor."""
    import numpy as np

    a = np.ascontiguousarray(array, dtype=dtype)
    return ("float32" if dtype == "<f4" else "float64"), int(a.size), a.tobytes()


def decode(blob: bytes, dtype: str, shape: tuple[int, ...]) -> "np.ndarray":
    """A writable numpy array of `shape` from stored bytes (see `_encode`)."""
    import numpy as np

    if dtype not in DTYPES:
        raise IntegrityError(f"a stored vector has the unknown dtype {dtype!r}", "run `kledger fsck`")
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    a = np.frombuffer(blob[:len(blob) - len(blob) % itemsize], dtype=DTYPES[dtype])
    if a.size != int(np.prod(shape)) or len(blob) % itemsize:
        raise IntegrityError(f"a stored vector has {a.size} values where its row says {list(shape)}",
                             "run `kledger fsck`, and restore the ledger from a backup or a text export")
    return a.reshape(shape).copy()


def vector_shape(blob: bytes, dtype: str, width: int) -> tuple[int, ...]:
    """The shape of a stored constraint vector of rows `width` wide: (width,) for one row (one
    reading), (R, width) for R rows; an IntegrityError when the bytes are not whole rows."""
    size = {"float32": 4, "float64": 8}.get(dtype)
    if size is None:
        return (int(width),)  # `decode` names the unknown dtype
    rows, left = divmod(len(blob), size * max(int(width), 1))
    if left or rows < 1:
        raise IntegrityError(f"a stored vector of {len(blob)} bytes is not whole {dtype} rows of {width} values",
                             "run `kledger fsck`, and restore the ledger from a backup or a text export")
    return (int(width),) if rows == 1 else (rows, int(width))


def constraint_shapes(r: tuple) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of a constraints row's key and value (`vector_shape`); an IntegrityError when
    they are not whole rows or not as many key rows as value rows (one per key reading)."""
    _, fid, _, dtype, d_in, d_out, key, value, _ = r
    k_shape, v_shape = vector_shape(key, dtype, d_in), vector_shape(value, dtype, d_out)
    if k_shape[:-1] != v_shape[:-1]:
        raise IntegrityError(f"a stored constraint of fact {fid[:10]} has {(k_shape[:-1] or (1,))[0]} key rows and "
                             f"{(v_shape[:-1] or (1,))[0]} value rows",
                             "run `kledger fsck`, and restore the ledger from a backup or a text export")
    return k_shape, v_shape


def constraint_from_row(r: tuple) -> Constraint:
    cid, fid, layer, dtype, d_in, d_out, key, value, fp = r
    k_shape, v_shape = constraint_shapes(r)
    return Constraint(fid, layer, decode(key, dtype, k_shape), decode(value, dtype, v_shape), fp, cid)


def fact_from_row(r) -> Fact:
    return Fact(subject=r[1], prompt=r[2], target=r[3], relation=r[4], target_true=r[5],
                paraphrases=tuple(r[6]), neighborhood=tuple(r[7]), extra=json.loads(r[8]) if r[8] != "{}" else {})
