"""The float64 solve: sequential editing with history equals the one-shot solve (the paper's
SE = OTE claim), retraction is the solve without the retracted constraints, and the modes."""

from __future__ import annotations

import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kledger.edit.solve import MODES, null_space_projector, rel_fro, sequential_update, solve_history, solve_layer  # noqa: E402

D_IN, D_OUT = 24, 12
LAM = 2.0


def make(seed: int = 0, n_batches: int = 5, per: int = 3):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    X = torch.randn(200, D_IN, generator=g, dtype=torch.float64)
    C0 = X.T @ X / X.shape[0]  # [d_in, d_in], positive definite
    batches = [(torch.randn(per, D_IN, generator=g, dtype=torch.float64),
                torch.randn(per, D_OUT, generator=g, dtype=torch.float64)) for _ in range(n_batches)]
    return W0, C0, batches


def cat(batches):
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def run_sequential(W0, C0, batches):
    W, H = W0, None
    for K, V in batches:
        W, H = sequential_update(W, K, V, C0, LAM, H)
    return W


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sequential_equals_one_shot(seed):
    W0, C0, batches = make(seed)
    K, V = cat(batches)
    one_shot = solve_layer(W0, K, V, C0, LAM)
    assert rel_fro(run_sequential(W0, C0, batches), one_shot) < 1e-9


def test_sequential_any_order_and_batching():
    W0, C0, batches = make(3, n_batches=5, per=4)
    K, V = cat(batches)
    one_shot = solve_layer(W0, K, V, C0, LAM)
    rng = random.Random(0)
    for _ in range(4):
        order = list(range(K.shape[0]))
        rng.shuffle(order)
        cuts = sorted(rng.sample(range(1, len(order)), 3))
        parts = [order[a:b] for a, b in zip([0] + cuts, cuts + [len(order)])]
        rebatched = [(K[p], V[p]) for p in parts]
        assert rel_fro(run_sequential(W0, C0, rebatched), one_shot) < 1e-9


def test_retract_batch_equals_solve_without_it():
    W0, C0, batches = make(4)
    kept = batches[:2] + batches[3:]
    full = solve_history(W0, batches, C0, LAM)
    without = solve_history(W0, kept, C0, LAM)
    K, V = cat(kept)
    assert rel_fro(without, solve_layer(W0, K, V, C0, LAM)) < 1e-12
    assert rel_fro(without, run_sequential(W0, C0, kept)) < 1e-9
    assert rel_fro(without, full) > 1e-3  # batch 3 really mattered


def test_small_lambda_satisfies_constraints():
    W0, C0, batches = make(5, n_batches=1, per=4)
    K, V = batches[0]
    W = solve_layer(W0, K, V, C0, 1e-8)
    assert torch.allclose(K @ W.T, V, atol=1e-6)


def test_shapes_dtypes_and_float32_inputs():
    W0, C0, batches = make(6)
    K, V = cat(batches)
    W = solve_layer(W0.float(), K.float(), V.float(), C0.float(), LAM)
    assert W.dtype == torch.float64 and W.shape == (D_OUT, D_IN)
    assert torch.equal(solve_layer(W0, K[:0], V[:0], C0, LAM), W0)
    assert torch.equal(solve_history(W0, [], C0, LAM), W0)
    with pytest.raises(ValueError):
        solve_layer(W0, K.T, V, C0, LAM)
    with pytest.raises(ValueError):
        solve_layer(W0, K, V[:, :3], C0, LAM)
    with pytest.raises(ValueError):
        solve_history(W0, batches, C0, LAM, mode="bogus")


def test_modes():
    W0, C0, batches = make(7)
    for mode in MODES:
        W = solve_history(W0, batches, C0, LAM, mode=mode, null_threshold=0.5)
        assert W.shape == W0.shape and torch.isfinite(W).all()
    # without history, earlier batches are overwritten: the accumulated solve fits batch 1 better
    K1, V1 = batches[0]
    acc = solve_history(W0, batches, C0, 1e-6)
    nohist = solve_history(W0, batches, C0, 1e-6, mode="no-history")
    err = lambda W: float((K1 @ W.T - V1).norm())  # noqa: E731
    assert err(acc) < 1e-4 < 1e-2 < err(nohist)
    # the accumulated mode ignores order; no-history does not
    rev = solve_history(W0, batches[::-1], C0, LAM)
    assert rel_fro(rev, solve_history(W0, batches, C0, LAM)) < 1e-12


def test_alphaedit_projector_and_null_space_preservation():
    g = torch.Generator().manual_seed(8)
    X = torch.randn(300, D_IN // 2, generator=g, dtype=torch.float64) @ torch.randn(
        D_IN // 2, D_IN, generator=g, dtype=torch.float64)
    C0 = X.T @ X / 300  # rank d_in/2: a real null space
    P = null_space_projector(C0, 1e-8)
    assert torch.allclose(P @ P, P, atol=1e-10) and abs(float(P.trace()) - D_IN // 2) < 1e-6
    W0 = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    K = torch.randn(3, D_IN, generator=g, dtype=torch.float64)
    V = torch.randn(3, D_OUT, generator=g, dtype=torch.float64)
    W = solve_history(W0, [(K, V)], C0, LAM, mode="alphaedit", null_threshold=1e-8)
    # the update lives in the null space: preserved keys (rows of X) see the same output
    assert torch.allclose(X @ W.T, X @ W0.T, atol=1e-8)


# ---------------------------------------------------------------------------- small solves (kledger.edit.prior)

@pytest.mark.parametrize("rows", [1, 3, 6])
def test_woodbury_equals_the_direct_solve(rows):
    from kledger.edit import prior

    W0, C0, batches = make(3, n_batches=1, per=rows)
    K, V = batches[0]
    M = prior.invert(C0.numpy(), LAM)
    got = prior.woodbury(W0.numpy(), K.numpy(), V.numpy(), M)
    want = solve_layer(W0, K, V, C0, LAM).numpy()
    assert abs(got - want).max() <= 1e-10 * abs(want - W0.numpy()).max()
    # the same bits whatever the memory layout of the inputs (a transposed view, as a loaded
    # GPT-2 layer gives, or a C-ordered file read)
    W0f = np.asfortranarray(W0.numpy())
    assert (prior.woodbury(W0f, K.numpy(), V.numpy(), M) == got).all()
    assert prior.small(rows, D_IN)  # a quarter of the key width at most
    assert not prior.small(D_IN // 4 + 1, D_IN) and not prior.small(0, D_IN)
    assert prior.small(2 * D_IN // 3, D_IN, cpu=True) and not prior.small(2 * D_IN // 3 + 1, D_IN, cpu=True)
    assert prior.cpu_only("cpu") and not prior.cpu_only("cuda:0")


def test_an_untrustworthy_inverse_is_refused():
    from kledger.edit import prior

    _, C0, _ = make(4)
    singular = C0.numpy().copy()
    singular[:, 0] = singular[0, :] = 0.0
    assert prior.invert(singular, LAM) is None
    Q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    ill = (Q * torch.logspace(0, -15, D_IN, dtype=torch.float64)) @ Q.T  # condition number 1e15
    assert prior.invert(ill.numpy(), LAM) is None
    assert prior.invert(C0.numpy(), LAM) is not None


def digest_of(C0):
    from kledger.records import blob_digest
    from kledger.store.codec import encode

    return blob_digest(encode(C0.numpy(), "<f8")[2])


def test_the_kept_inverse_is_signed_and_recomputed_when_damaged(tmp_path):
    from kledger.edit import prior

    W0, C0, batches = make(5, n_batches=1, per=2)
    calls = []

    def c0():
        calls.append(1)
        return {3: C0.numpy()}

    digests = {3: digest_of(C0)}
    kv = {3: (batches[0][0].numpy(), batches[0][1].numpy())}
    first = prior.solve_small({3: W0.numpy()}, kv, LAM, digests, tmp_path, "secret", c0)
    again = prior.solve_small({3: W0.numpy()}, kv, LAM, digests, tmp_path, "secret", c0)
    assert len(calls) == 1 and (first[3] == again[3]).all() and first[3].dtype.name == "float32"
    (path,) = tmp_path.glob("*.safetensors")
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # one byte of M changed outside kledger
    path.write_bytes(bytes(data))
    third = prior.solve_small({3: W0.numpy()}, kv, LAM, digests, tmp_path, "secret", c0)
    assert len(calls) == 2 and (third[3] == first[3]).all()
    # another λ or another C0 checksum is another key; too many rows or C0 not stored: no small solve
    assert prior.prior_key(digests, LAM) != prior.prior_key(digests, 2 * LAM) != prior.prior_key({3: "e" * 64}, LAM)
    big = {3: (torch.randn(D_IN // 4 + 1, D_IN).numpy(), torch.randn(D_IN // 4 + 1, D_OUT).numpy())}
    assert prior.solve_small({3: W0.numpy()}, big, LAM, digests, tmp_path, "secret", c0) is None
    assert prior.solve_small({3: W0.numpy()}, kv, LAM, {3: None}, tmp_path, "secret", c0) is None
    # C0 that does not have the stored checksum (changed since), or no secret: no small solve
    assert prior.solve_small({3: W0.numpy()}, kv, LAM, {3: "e" * 64}, tmp_path, "secret", c0) is None
    assert prior.solve_small({3: W0.numpy()}, kv, LAM, digests, tmp_path, None, c0) is None


def test_a_refused_inverse_is_remembered(tmp_path):
    from kledger.edit import prior

    W0, _, batches = make(8, n_batches=1, per=2)
    Q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=torch.Generator().manual_seed(9), dtype=torch.float64))
    ill = (Q * torch.logspace(0, -15, D_IN, dtype=torch.float64)) @ Q.T
    calls = []

    def c0():
        calls.append(1)
        return {3: ill.numpy()}

    kv = {3: (batches[0][0].numpy(), batches[0][1].numpy())}
    for _ in range(2):
        assert prior.solve_small({3: W0.numpy()}, kv, LAM, {3: digest_of(ill)}, tmp_path, "secret", c0) is None
    assert len(calls) == 1  # the refusal was kept, not computed again


def test_an_unwritable_folder_for_the_inverse_is_not_an_error(tmp_path):
    from kledger.edit import prior

    W0, C0, batches = make(7, n_batches=1, per=2)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    kv = {3: (batches[0][0].numpy(), batches[0][1].numpy())}
    got = prior.solve_small({3: W0.numpy()}, kv, LAM, {3: digest_of(C0)}, blocked / "prior", "secret",
                            lambda: {3: C0.numpy()})
    assert got is not None and not (blocked / "prior").exists()
