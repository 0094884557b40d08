"""msign (Newton-Schulz) against the float64 SVD polar factor."""

import re

import pytest
import torch

from megatron_sso.ops import COEFFICIENT_SETS, msign, resolve_coefficients
from tests.reference.svd_reference import msign_ref

SHAPES = [(1, 7), (7, 1), (16, 16), (32, 96), (96, 32), (3, 5)]


def _well_conditioned(m, n, seed=0, cond=20.0):
    """A matrix with singular values spread over [1/cond, 1] (no near-zero values)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), min(m, n), dtype=torch.float64)
    return (U * s) @ V.T


@pytest.mark.parametrize("shape", SHAPES)
def test_sso8_matches_svd(shape):
    X = _well_conditioned(*shape)
    # 8 sso8 steps reach singular values 1 +- 1e-6 for condition <= 1e3 after Frobenius
    # normalisation (measured); 1e-4 absolute leaves room for fp32 round-off.
    err = (msign(X.float()).double() - msign_ref(X)).abs().max().item()
    assert err < 1e-4


@pytest.mark.parametrize("shape", SHAPES)
def test_muon5_is_approximate_polar(shape):
    # Muon's 5-step quintic maps singular values into ~[0.68, 1.2] (K. Jordan 2024), not to 1.
    s = torch.linalg.svdvals(msign(_well_conditioned(*shape).float(), coefficients="muon5").double())
    assert s.min() > 0.6 and s.max() < 1.25


def test_output_dtype_shape_and_batching():
    X = torch.randn(3, 8, 12, dtype=torch.bfloat16)
    Y = msign(X)
    assert Y.dtype == torch.bfloat16 and Y.shape == X.shape
    Xf = torch.randn(4, 2, 9, 6)
    loop = torch.stack([torch.stack([msign(Xf[i, j]) for j in range(2)]) for i in range(4)])
    torch.testing.assert_close(msign(Xf), loop, atol=2e-6, rtol=0)


def test_bf16_compute_is_looser_but_close():
    X = _well_conditioned(32, 64).float()
    err = (msign(X, compute_dtype=torch.bfloat16).double() - msign_ref(X)).abs().max().item()
    assert err < 0.05  # bf16 has 8 mantissa bits: ~4e-3 relative per product, compounded over 8 steps


def test_zero_matrix_maps_to_zero():
    assert torch.count_nonzero(msign(torch.zeros(5, 7))) == 0


def test_rank_deficient_input_is_finite():
    u = torch.randn(10, 1)
    Y = msign(u @ torch.randn(1, 6))
    assert torch.isfinite(Y).all()
    assert abs(torch.linalg.matrix_norm(Y, ord=2).item() - 1.0) < 1e-3


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="nope"):
        msign(torch.randn(3, 3), coefficients="nope")
    with pytest.raises(ValueError, match="shape"):
        msign(torch.randn(3))
    with pytest.raises(ValueError, match="steps"):
        msign(torch.randn(3, 3), steps=0)
    with pytest.raises(ValueError, match="int8|dtype"):
        msign(torch.randn(3, 3), compute_dtype=torch.int8)


def test_coefficient_sets_as_documented():
    assert len(COEFFICIENT_SETS["sso8"]) == 8
    assert COEFFICIENT_SETS["muon5"][0] == (3.4445, -4.7750, 2.0315)
    assert len(resolve_coefficients("muon5", None)) == 5
    assert resolve_coefficients("sso8", 10)[-1] == COEFFICIENT_SETS["sso8"][-1]


def test_sharded_hooks_match_single_process():
    """Emulate a 2-way split: the all-reduce sums the per-shard partial results in-process."""
    X = torch.randn(12, 20)
    for pdim in (0, 1):
        shards = list(X.chunk(2, dim=pdim))
        # Run both shards in lock-step by stacking them; the "all-reduce" sums the stack.
        stacked = torch.stack(shards)

        def allreduce(t):
            return t.sum(dim=0, keepdim=True).expand_as(t).clone()

        out = msign(stacked, allreduce=allreduce, partition_dim=pdim)
        torch.testing.assert_close(torch.cat(list(out), dim=pdim), msign(X), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["standard", "gram"])
@pytest.mark.parametrize("scale", [1e-12, 1e-20, 1e-30, 1e-38, 1e-41])
def test_tiny_gradients_keep_their_polar_factor(scale, method):
    """msign is scale-invariant, so a gradient with ||G||_F far below 1 must give the same U V^T.
    (With 1e-7 added to the norm, ||G||_F = 1e-12 gave spectral norm 0.018 instead of 1; in fp32
    the sum of squares underflows once entries drop below ~1e-19.) The reference is the float64
    SVD of the float32 input itself, so the rounding of subnormal entries (1e-41) is not counted."""
    X = _well_conditioned(16, 48).float() * scale
    assert X.abs().max() > 0
    err = (msign(X, method=method).double() - msign_ref(X.double())).abs().max().item()
    assert err < 1e-4, err


def test_tiny_gradient_sharded_matches_single_process():
    X = _well_conditioned(12, 20).float() * 1e-30
    stacked = torch.stack(list(X.chunk(2, dim=1)))
    out = msign(stacked, allreduce=lambda t: t.sum(dim=0, keepdim=True).expand_as(t).clone(), partition_dim=1)
    torch.testing.assert_close(torch.cat(list(out), dim=1), msign(X), atol=1e-5, rtol=0)
    assert abs(torch.linalg.matrix_norm(msign(X), ord=2).item() - 1.0) < 1e-3


@pytest.mark.parametrize("bad", [None, 3, ["sso8"], [(1.0, 2.0)], []])
def test_bad_coefficients_name_the_valid_sets(bad):
    with pytest.raises(ValueError, match=r"one of \['muon5', 'sso8'\].*got " + re.escape(repr(bad))):
        msign(torch.randn(3, 3), coefficients=bad)
