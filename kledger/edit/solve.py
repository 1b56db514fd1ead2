"""The per-layer least-squares solve, in float64. Pure linear algebra: no model.

Rows are constraints: K [n, d_in] keys, V [n, d_out] target outputs, W [d_out, d_in] canonical.

    W_S = W0 + (Σ_i (v_i − W0 k_i) k_iᵀ) (λ C0 + Σ_i k_i k_iᵀ)⁻¹

solved as the symmetric system A Δᵀ = Kᵀ R with A = λC0 + KᵀK, R = V − K W0ᵀ (Cholesky, or LU
when A is not positive definite). Never an explicit inverse; TF32 off. `device` (keyword, default
the CPU) says where the float64 arithmetic runs (a CUDA device when there is one); inputs may live
anywhere. `solve_layer` and `solve_history` return on the CPU; the one-step helpers
(`sequential_update`, `alphaedit_update`, `null_space_projector`) return on `device`.

Modes for a history of batches (commits in order), `solve_history`:
  "accumulated"          the paper's solve over all constraints at once (order-free; = SE with H)
  "no-history"           each batch solved against λC0 alone, applied one after another
  "alphaedit"            AlphaEdit: null-space projector P of C0 and a ridge, with history H
  "alphaedit-no-history" AlphaEdit as published for one batch, stacked without H (collapses)
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from ..settings import MODES

F64 = torch.float64
DEFAULT_RIDGE = 10.0  # AlphaEdit's L2 (its Llama-3 setting)
DEFAULT_NULL_THRESHOLD = 2e-2  # AlphaEdit's null-space eigenvalue threshold (on a mean C0)

KV = tuple[torch.Tensor, torch.Tensor]  # (K [n, d_in], V [n, d_out])


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Disable TF32 for matmuls and convolutions for the duration (restored after). Uses torch's
    `fp32_precision` settings where they exist: reading the legacy `allow_tf32` flags raises once a
    program (e.g. transformers' `enable_tf32`) has set the new ones."""
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(m, "fp32_precision") and hasattr(c, "fp32_precision"):
        prev = (m.fp32_precision, c.fp32_precision)
        m.fp32_precision = c.fp32_precision = "ieee"
        try:
            yield
        finally:
            m.fp32_precision, c.fp32_precision = prev
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def spd_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """X with A X = B for symmetric A [d, d], B [d, m]; Cholesky, LU if A is not positive definite."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(B, L)
    return torch.linalg.solve(A, B)


def _check(W0: torch.Tensor, K: torch.Tensor, V: torch.Tensor, C0: torch.Tensor | None) -> None:
    d_out, d_in = W0.shape
    if K.ndim != 2 or K.shape[1] != d_in:
        raise ValueError(f"K must be [n, {d_in}], got {tuple(K.shape)}")
    if V.ndim != 2 or V.shape != (K.shape[0], d_out):
        raise ValueError(f"V must be [{K.shape[0]}, {d_out}], got {tuple(V.shape)}")
    if C0 is not None and C0.shape != (d_in, d_in):
        raise ValueError(f"C0 must be [{d_in}, {d_in}], got {tuple(C0.shape)}")


def _dev(device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def _f64(*ts: torch.Tensor, device: torch.device | str | None = None) -> list[torch.Tensor]:
    dev = _dev(device)
    return [t.detach().to(device=dev, dtype=F64) for t in ts]


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.to("cpu") if t.device.type != "cpu" else t


def _stack(batches: Sequence[KV], d_in: int, d_out: int, device: torch.device | str | None = None) -> KV:
    dev = _dev(device)
    if not batches:
        return torch.zeros(0, d_in, dtype=F64, device=dev), torch.zeros(0, d_out, dtype=F64, device=dev)
    K = torch.cat([b[0].detach().to(dev, F64) for b in batches])  # [n, d_in]
    V = torch.cat([b[1].detach().to(dev, F64) for b in batches])  # [n, d_out]
    return K, V


def solve_layer(W0: torch.Tensor, K: torch.Tensor, V: torch.Tensor, C0: torch.Tensor, lam: float,
                mode: str = "accumulated", *, device: torch.device | str | None = None, **opts: float) -> torch.Tensor:
    """The solved weight [d_out, d_in] (float64, CPU) for one set of constraints. For "accumulated"
    this is the one-shot OTE solution; other modes treat (K, V) as a single batch."""
    if mode != "accumulated":
        return solve_history(W0, [(K, V)], C0, lam, mode, device=device, **opts)
    W0, K, V, C0 = _f64(W0, K, V, C0, device=device)
    _check(W0, K, V, C0)
    if K.shape[0] == 0:
        return _cpu(W0).clone()
    with no_tf32():
        R = V - K @ W0.T  # [n, d_out]
        A = lam * C0 + K.T @ K  # [d_in, d_in]
        dWt = spd_solve(A, K.T @ R)  # [d_in, d_out]
    return _cpu(W0 + dWt.T)


def sequential_update(W_prev: torch.Tensor, K_t: torch.Tensor, V_t: torch.Tensor, C0: torch.Tensor,
                      lam: float, H_prev: torch.Tensor | None = None, *,
                      device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of sequential editing with history (the paper's SE):
    ΔW_t = (V_t − W_{t−1}K_t) K_tᵀ (λC0 + H_{t−1} + K_tK_tᵀ)⁻¹. Returns (W_t [d_out, d_in],
    H_t = H_{t−1} + K_tᵀK_t [d_in, d_in]), both float64, on `device` (CPU by default)."""
    W_prev, K_t, V_t, C0 = _f64(W_prev, K_t, V_t, C0, device=device)
    _check(W_prev, K_t, V_t, C0)
    H_prev = torch.zeros_like(C0) if H_prev is None else H_prev.detach().to(C0.device, F64)
    with no_tf32():
        H_t = H_prev + K_t.T @ K_t  # [d_in, d_in]
        R = V_t - K_t @ W_prev.T  # [n, d_out]
        dWt = spd_solve(lam * C0 + H_t, K_t.T @ R)  # [d_in, d_out]
    return W_prev + dWt.T, H_t


def null_space_projector(C0: torch.Tensor, threshold: float = DEFAULT_NULL_THRESHOLD, *,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """AlphaEdit's P [d_in, d_in]: projector onto the eigenvectors of C0 whose eigenvalues are
    below `threshold` (the directions the preserved knowledge does not use); on `device`."""
    (C0,) = _f64(C0, device=device)
    evals, evecs = torch.linalg.eigh((C0 + C0.T) / 2)  # ascending
    U = evecs[:, evals < threshold]  # [d_in, r]
    return U @ U.T


def alphaedit_update(W_prev: torch.Tensor, K_t: torch.Tensor, V_t: torch.Tensor, P: torch.Tensor,
                     H_prev: torch.Tensor | None, ridge: float = DEFAULT_RIDGE, *,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """AlphaEdit's closed form for one batch: Δ = R Kᵀ P ((H + KᵀK) P + ridge·I)⁻¹, applied to
    W_prev; R = V − K W_prevᵀ. H_prev None or zero is the published single-batch form. The
    result stays on `device` (CPU by default)."""
    W_prev, K_t, V_t, P = _f64(W_prev, K_t, V_t, P, device=device)
    d_in = P.shape[0]
    H = torch.zeros(d_in, d_in, dtype=F64, device=P.device) if H_prev is None else H_prev.detach().to(P.device, F64)
    with no_tf32():
        R = V_t - K_t @ W_prev.T  # [n, d_out]
        # Δᵀ = (P (H + KᵀK) + ridge I)⁻¹ P Kᵀ R   (not symmetric: LU)
        A = P @ (H + K_t.T @ K_t) + ridge * torch.eye(d_in, dtype=F64, device=P.device)  # [d_in, d_in]
        dWt = torch.linalg.solve(A, P @ (K_t.T @ R))  # [d_in, d_out]
    return W_prev + dWt.T


def solve_history(W0: torch.Tensor, batches: Sequence[KV], C0: torch.Tensor, lam: float,
                  mode: str = "accumulated", *, ridge: float = DEFAULT_RIDGE,
                  null_threshold: float = DEFAULT_NULL_THRESHOLD,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """The weight [d_out, d_in] (float64, CPU) after the batches (commits, in order) under `mode`,
    computed on `device`. Order matters only for the non-accumulated modes. `lam` is unused by the
    AlphaEdit modes, which use `ridge` and the projector of C0 instead."""
    if mode not in MODES:
        raise ValueError(f"unknown solver mode {mode!r}; choose one of {', '.join(MODES)}")
    (W,) = _f64(W0, device=device)
    d_out, d_in = W.shape
    if mode == "accumulated":
        K, V = _stack(batches, d_in, d_out, device)
        return solve_layer(W, K, V, C0, lam, device=device)
    (C0,) = _f64(C0, device=device)
    if mode == "no-history":
        for K_t, V_t in batches:
            W, _ = sequential_update(W, K_t, V_t, C0, lam, None, device=device)
        return _cpu(W)
    P = null_space_projector(C0, null_threshold, device=device)
    H = torch.zeros(d_in, d_in, dtype=F64, device=W.device)
    for K_t, V_t in batches:
        K_t, V_t = _f64(K_t, V_t, device=device)
        _check(W, K_t, V_t, None)
        W = alphaedit_update(W, K_t, V_t, P, H if mode == "alphaedit" else None, ridge, device=device)
        H = H + K_t.T @ K_t
    return _cpu(W)


def rel_fro(A: torch.Tensor, B: torch.Tensor) -> float:
    """‖A − B‖_F / ‖B‖_F in float64."""
    A, B = _f64(A, B)
    return float(torch.linalg.matrix_norm(A - B) / torch.linalg.matrix_norm(B).clamp_min(1e-300))
