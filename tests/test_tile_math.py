"""`prefloss.fused.tile_math`: the torch backend's tile arithmetic, eager and compiled, against float64."""

from __future__ import annotations

import warnings

import pytest
import torch

from prefloss.fused import tile_math

TOL = {torch.float32: 2e-6, torch.float64: 1e-12}


def _tiles(dtype, rows=5, cols=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, cols, generator=g, dtype=torch.float64) * 3).to(dtype)
    z_ref = (z.double() + torch.randn(rows, cols, generator=g, dtype=torch.float64)).to(dtype)
    return z, z_ref


def _expected_lses(z, z_ref, eps):
    z, z_ref = z.double(), z_ref.double()
    mixes = [(1 + eps) * z - eps * z_ref, (1 - eps) * z + eps * z_ref]
    return [torch.logsumexp(m, 1) for m in [z, z_ref, *mixes]]


@pytest.fixture
def fresh_fused(monkeypatch):
    """Isolates the class-wide compile-failure flag and the compiled functions."""
    monkeypatch.setattr(tile_math._Fused, "failed", None)
    monkeypatch.setattr(tile_math, "_LOG_SUM_EXPS", tile_math._Fused(tile_math.log_sum_exps))
    monkeypatch.setattr(tile_math, "_NEG_SOFTMAX_TIMES", tile_math._Fused(tile_math.neg_softmax_times_))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", ["never", "always"])
def test_log_sum_exps_against_float64(dtype, mode, monkeypatch):
    monkeypatch.setenv("PREFLOSS_COMPILE", mode)
    z, z_ref = _tiles(dtype)
    eps = 0.3
    lse = tile_math.log_sum_exps_for(z.numel(), tuple(z.shape), dtype, z.device, eps)
    got = lse(z, z_ref)
    want = _expected_lses(z, z_ref, eps)
    assert len(got) == 4
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == torch.float64 and a.shape == (5,)
        assert (a - e).abs().max() <= TOL[dtype] * 10, f"lse {i}: {(a - e).abs().max():.2e}"
    policy_only = tile_math.log_sum_exps_for(z.numel(), tuple(z.shape), dtype, z.device, None)
    torch.testing.assert_close(policy_only(z, None)[0], want[0], rtol=0, atol=TOL[dtype] * 10)


@pytest.mark.parametrize("mode", ["never", "always"])
def test_log_sum_exps_on_a_smaller_tile_than_the_scratch(mode, monkeypatch):
    """The last chunk / last vocabulary tile is smaller than the scratch the functions were set up for."""
    monkeypatch.setenv("PREFLOSS_COMPILE", mode)
    lse = tile_math.log_sum_exps_for(10**8, (8, 64), torch.float32, torch.device("cpu"), 0.1)
    z, z_ref = _tiles(torch.float32, rows=3, cols=17)
    for a, e in zip(lse(z, z_ref), _expected_lses(z, z_ref, 0.1), strict=True):
        assert (a - e).abs().max() < 2e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", ["never", "always"])
def test_neg_softmax_times_in_place(dtype, mode, monkeypatch):
    monkeypatch.setenv("PREFLOSS_COMPILE", mode)
    z, _ = _tiles(dtype)
    lse = torch.logsumexp(z.double(), 1).to(dtype)
    g = torch.tensor([0.5, -2.0, 0.0, 1.0, 3.0], dtype=dtype)
    want = -g.double()[:, None] * torch.softmax(z.double(), 1)
    grad = tile_math.neg_softmax_times_for(10**8, z.device)
    out = grad(z, lse, g)
    assert out.data_ptr() == z.data_ptr() and out.dtype == dtype
    if mode == "always":
        assert tile_math.used_compiled()
    assert (out.double() - want).abs().max() <= TOL[dtype] * 10


def test_mode_reads_the_environment(monkeypatch):
    for raw, want in [
        ("auto", "auto"),
        ("1", "always"),
        ("ALWAYS", "always"),
        ("0", "never"),
        ("never", "never"),
    ]:
        monkeypatch.setenv("PREFLOSS_COMPILE", raw)
        assert tile_math.mode() == want
    monkeypatch.setenv("PREFLOSS_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="PREFLOSS_COMPILE must be one of .*got 'sometimes'"):
        tile_math.mode()


def test_auto_compiles_only_large_cpu_work(monkeypatch, fresh_fused):
    monkeypatch.setenv("PREFLOSS_COMPILE", "auto")
    cpu = torch.device("cpu")
    assert tile_math.should_compile(tile_math.COMPILE_MIN_ELEMENTS, cpu)
    assert not tile_math.should_compile(tile_math.COMPILE_MIN_ELEMENTS - 1, cpu)
    assert not tile_math.should_compile(10**9, torch.device("meta"))
    monkeypatch.setenv("PREFLOSS_COMPILE", "never")
    assert not tile_math.should_compile(10**9, cpu)
    monkeypatch.setenv("PREFLOSS_COMPILE", "always")
    assert tile_math.should_compile(1, cpu)


def test_compile_failure_warns_once_and_runs_eagerly(monkeypatch, fresh_fused):
    def broken_compile(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setenv("PREFLOSS_COMPILE", "always")
    z, z_ref = _tiles(torch.float32)
    lse = tile_math.log_sum_exps_for(10**8, tuple(z.shape), torch.float32, z.device, 0.3)
    with pytest.warns(
        RuntimeWarning, match=r"failed \(RuntimeError: no C\+\+ compiler found\); running it eagerly"
    ):
        got = lse(z, z_ref)
    for a, e in zip(got, _expected_lses(z, z_ref, 0.3), strict=True):
        assert (a - e).abs().max() < 2e-5
    assert not tile_math.should_compile(10**8, z.device)  # later calls go straight to the eager path
    assert not tile_math.used_compiled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lse2 = tile_math.log_sum_exps_for(10**8, tuple(z.shape), torch.float32, z.device, 0.3)
        lse2(z, z_ref)
