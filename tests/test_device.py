"""Device choice: --device / $KLEDGER_DEVICE, checked before anything is loaded or written.
This machine has no GPU, so the CUDA paths themselves are exercised only where CUDA exists
(`test_cuda_matches_cpu` runs there and is skipped here)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import snapshot  # noqa: E402
from conftest_edit import save_tiny_model_dir, tiny_lm, word_corpus  # noqa: E402

from kledger.edit.device import check_device_name, resolve_device  # noqa: E402
from kledger.errors import InputError  # noqa: E402
from kledger.settings import Settings  # noqa: E402

NO_CUDA = not torch.cuda.is_available()


def test_device_names(monkeypatch):
    assert check_device_name("auto") == "auto"
    assert check_device_name(" CPU ") == "cpu"
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    monkeypatch.setenv("KLEDGER_DEVICE", "cpu")
    assert resolve_device(Settings.from_env().device) == torch.device("cpu")
    for bad in ("tpu", "mps", "gpu"):
        with pytest.raises(InputError, match="device"):
            check_device_name(bad)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(InputError, match="no CUDA device") as e:
        resolve_device("cuda")
    assert "--device cpu" in e.value.one_line()


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_cuda_matches_cpu():
    """On a machine with CUDA: the edit and the solve on the GPU give the CPU's constraints and
    weights to float32 round-off."""
    from kledger.edit.engine import EditRequest, compute_constraints
    from kledger.edit.hparams import HParams
    from kledger.edit.solve import rel_fro, solve_history
    from kledger.edit.spec import get_weight
    from kledger.edit.stats import compute_c0

    hp = HParams(layers=(1, 2), steps=5, n_prefixes=2, lam=5.0)
    text = word_corpus(800)
    reqs = [EditRequest("the Eiffel Tower is located in the city of", "Eiffel Tower", "Rome"),
            EditRequest("Toko Yasuda plays the", "Toko Yasuda", "guitar")]
    out = {}
    # one C0 for both: the tiny model's C0 is near-singular, so float32 round-off in C0 alone
    # would move the solved weights by order one; each device's own C0 is compared on its own
    c0_ref, _ = compute_c0(tiny_lm("llama"), hp.layers, text, n_tokens=600, seq_len=32)
    for dev in ("cpu", "cuda"):
        lm = tiny_lm("llama")
        lm.model.to(dev)
        c0, _ = compute_c0(lm, hp.layers, text, n_tokens=600, seq_len=32)
        W0 = {la: get_weight(lm.model, lm.spec, la).double() for la in hp.layers}
        new = compute_constraints(lm, reqs, hp, c0_ref, W0, {})
        out[dev] = (c0, new, {la: solve_history(W0[la], [new[la]], c0_ref[la], hp.lam, device=dev) for la in hp.layers})
    for la in hp.layers:
        assert rel_fro(out["cuda"][0][la], out["cpu"][0][la]) < 1e-5
        assert rel_fro(out["cuda"][1][la][1], out["cpu"][1][la][1]) < 1e-4
        assert out["cuda"][2][la].device.type == "cpu"
        assert rel_fro(out["cuda"][2][la], out["cpu"][2][la]) < 1e-4


def test_no_tf32_restores_either_api():
    from kledger.edit.solve import no_tf32

    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        before = m.fp32_precision
        m.fp32_precision = "tf32"  # as transformers' enable_tf32 does; the legacy flags then raise
        try:
            with no_tf32():
                assert m.fp32_precision == "ieee"
            assert m.fp32_precision == "tf32"
        finally:
            m.fp32_precision = before
    with no_tf32():
        pass


def test_solve_device_keyword_returns_cpu():
    from kledger.edit.solve import MODES, solve_history

    g = torch.Generator().manual_seed(0)
    W0, C0 = torch.randn(6, 5, generator=g), torch.eye(5)
    batches = [(torch.randn(2, 5, generator=g), torch.randn(2, 6, generator=g)) for _ in range(3)]
    for mode in MODES:
        a = solve_history(W0, batches, C0, 1.0, mode)
        b = solve_history(W0, batches, C0, 1.0, mode, device="cpu")
        assert a.device.type == b.device.type == "cpu" and a.dtype == torch.float64
        assert torch.equal(a, b)


@pytest.fixture
def model_ledger(k, tmp_path):
    d = save_tiny_model_dir(tmp_path / "tiny", corpus_words=600)
    r = k("init", "--model", str(d), "--corpus", str(d / "corpus.txt"),
          "--set", "c0_tokens=500", "--set", "c0_seq_len=32", "--set", "steps=3", "--set", "n_prefixes=1")
    assert r.code == 0, r.err
    return tmp_path / ".kledger"


def test_bad_device_name_is_a_usage_error(k, ledger_dir):
    r = k("--device", "tpu", "log")
    assert r.code == 2
    assert "unknown device 'tpu'" in r.err and "--device auto, cpu, cuda or cuda:N" in r.err
    assert len(r.err.strip().splitlines()) == 1


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_commit_on_missing_cuda_fails_cleanly(k, model_ledger):
    assert k("add", "the Eiffel Tower is located in the city of", "Rome", "--subject", "Eiffel Tower").code == 0
    before = snapshot(model_ledger)
    r = k("--device", "cuda", "commit", "-m", "move it")
    assert r.code == 2, r.err
    assert "no CUDA device" in r.err and len(r.err.strip().splitlines()) == 1
    assert snapshot(model_ledger) == before
    r = k("--device", "cpu", "commit", "-m", "move it")
    assert r.code == 0, r.err
    r = k("--device", "cpu", "ask", "the Eiffel Tower is located in the city of", "--json")
    assert r.code == 0, r.err
