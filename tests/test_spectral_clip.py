"""SPECTRA spectral clipping (SPEC §5) against float64 SVD references.

Tolerances and where they come from:

* fp32 soft clip, per singular value: 1% is the specification; measured worst cases are
  ~3e-7 (well-conditioned), ~1e-3 ("one singular value 100x the rest" at ``c = 0.1``, where
  ``kappa(A) ~ 2e5`` amplifies the fp32 Gram's round-off) -- see the module docstring.
* fp32 full matrix vs ``U f(S) V^T``: 1e-2 relative Frobenius (measured <= 8e-4).
* bf16 compute (the documented looser tolerance): 3% per singular value and 2% in
  Frobenius norm for ``kappa(A) <= 4`` (measured 1.9% / 1.2%; bf16's unit round-off is
  2^-8 = 0.4% and the bf16 spectral floor 2^-6 adds up to 2% when ``s > 64``).
* sharded vs unsharded: 1e-5 relative (the brief); only the summation order of the Gram
  differs (measured 1.6e-6 fp32 well-conditioned, 7e-13 float64 spiky). The spiky matrix in
  fp32 is held to 3e-4 instead: kappa(A) ~ 2.5e3 carries the reordering to ~9e-5, which is
  also each result's own distance from the SVD reference.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_sso.ops.spectral_clip import (
    DEFAULT_SOFT_CLIP_STEPS,
    SOFT_CLIP_COEFFICIENTS,
    SOFT_CLIP_DESIGN,
    design_soft_clip_coefficients,
    hard_spectral_clip,
    soft_spectral_clip,
    spectra_update_scale,
)
from tests.reference.spectral_clip_reference import (
    coordinates_in_singular_basis,
    floored_soft_clip_scalar,
    hard_clip_ref,
    matrix_with_spectrum,
    soft_clip_ref,
    soft_clip_scalar,
)

SHAPES = [(48, 24), (24, 48), (32, 32), (1, 40), (40, 1)]  # tall, wide, square, 1xN, Nx1


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Matrices here are <= 48 wide: one thread does each op in microseconds, while two
    OpenMP threads on a busy 2-core machine spend ~10 ms per op synchronising (measured
    0.2 ms vs 670 ms per soft clip). Restored afterwards for the other test modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


LEVELS = [0.1, 1.0, 5.0, 10.0]


def well_conditioned(m: int, n: int) -> torch.Tensor:
    """Singular values evenly spread over [0.5, 1] (condition number 2), float32."""
    k = min(m, n)
    return matrix_with_spectrum(m, n, torch.linspace(1.0, 0.5, k), seed=100 * m + n).float()


def spiky(m: int, n: int) -> torch.Tensor:
    """Bulk singular values in [0.05, 0.5] and one of 50 (100x the largest of the rest)."""
    k = min(m, n)
    s = torch.linspace(0.5, 0.05, k, dtype=torch.float64)
    s[0] = 50.0
    return matrix_with_spectrum(m, n, s, seed=100 * m + n + 7).float()


def sv_rel_err(H: torch.Tensor, X: torch.Tensor, c: float) -> float:
    """Worst relative error of the values ``H`` puts on ``X``'s singular pairs vs ``f(sigma)``."""
    target = soft_clip_scalar(torch.linalg.svdvals(X.double()), c)
    got = coordinates_in_singular_basis(H, X)
    return float(((got - target).abs() / target).max())


def frob_rel_err(H: torch.Tensor, R: torch.Tensor) -> float:
    return float((H.double() - R).norm() / R.norm())


# --------------------------------------------------------------------------- soft clip: accuracy


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("c", LEVELS)
@pytest.mark.parametrize("spectrum", [well_conditioned, spiky], ids=["well", "spiky"])
def test_soft_clip_singular_values_and_vectors_fp32(shape, c, spectrum):
    X = spectrum(*shape)
    H = soft_spectral_clip(X, c)
    assert H.shape == X.shape and H.dtype == X.dtype
    assert sv_rel_err(H, X, c) < 1e-2
    assert frob_rel_err(H, soft_clip_ref(X, c)) < 1e-2


@pytest.mark.parametrize("c", LEVELS)
def test_soft_clip_float64_compute_is_near_exact(c):
    X = spiky(40, 24).double()
    H = soft_spectral_clip(X, c, compute_dtype=torch.float64)
    assert H.dtype == torch.float64
    # the float64 table converges to 4.2e-10 (SOFT_CLIP_COEFFICIENTS comment)
    assert frob_rel_err(H, soft_clip_ref(X, c)) < 1e-8


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("c", LEVELS)
def test_soft_clip_bf16_compute_within_documented_tolerance(shape, c):
    X = well_conditioned(*shape)
    H = soft_spectral_clip(X, c, compute_dtype=torch.bfloat16)
    assert H.dtype == torch.float32 and torch.isfinite(H).all()
    assert sv_rel_err(H, X, c) < 3e-2
    assert frob_rel_err(H, soft_clip_ref(X, c)) < 2e-2


@pytest.mark.parametrize("c", LEVELS)
def test_soft_clip_bf16_spiky_stays_bounded(c):
    # Outside the bf16 range (s >> 64) accuracy of the small singular values is not promised,
    # but the output must stay finite, inside the clip ball, and get the spike right.
    X = spiky(48, 24)
    H = soft_spectral_clip(X, c, compute_dtype=torch.bfloat16)
    assert torch.isfinite(H).all()
    sv = torch.linalg.svdvals(H.double())
    assert sv[0] <= c * 1.03
    top = soft_clip_scalar(torch.tensor(50.0), c)
    assert abs(float(coordinates_in_singular_basis(H, X)[0]) - float(top)) / float(top) < 3e-2


def test_bf16_input_keeps_dtype():
    X = well_conditioned(32, 16).bfloat16()
    H = soft_spectral_clip(X, 1.0)
    assert H.dtype == torch.bfloat16 and H.shape == X.shape
    assert frob_rel_err(H.float(), soft_clip_ref(X.float(), 1.0)) < 1e-2


def test_soft_clip_maps_into_the_ball_and_never_grows():
    X = spiky(40, 32)
    for c in LEVELS:
        sv = torch.linalg.svdvals(soft_spectral_clip(X, c).double())
        assert sv[0] <= c * (1 + 1e-5)
        assert torch.all(sv <= torch.linalg.svdvals(X.double()) * (1 + 1e-5))


# --------------------------------------------------------------------------- soft clip: edge cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_zero_input_gives_zero(dtype):
    for shape in [(5, 3), (3, 5), (1, 1), (2, 4, 6)]:
        Z = torch.zeros(shape)
        H = soft_spectral_clip(Z, 1.0, compute_dtype=dtype)
        assert torch.equal(H, Z)
        assert torch.equal(hard_spectral_clip(Z, 1.0), Z)


def test_batched_equals_loop():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(3, 2, 24, 16, generator=g)
    X[0, 1] *= 100.0  # very different scales must not talk to each other
    X[2, 0] = 0.0
    X[1, 1] = spiky(24, 16)
    for clip in (lambda A: soft_spectral_clip(A, 5.0), lambda A: hard_spectral_clip(A, 5.0)):
        batched = clip(X)
        assert batched.shape == X.shape
        for i in range(3):
            for j in range(2):
                looped = clip(X[i, j])
                # Batched and 2-D matmul kernels round differently (fp32, ~1e-7) and the
                # iteration carries that through kappa(A): measured <= 5e-6.
                diff = float((batched[i, j] - looped).norm())
                assert diff <= 2e-5 * float(looped.norm()), (i, j, diff)
        assert torch.equal(batched[2, 0], torch.zeros(24, 16))


def test_wide_batch_matches_loop():
    X = torch.stack([spiky(16, 40), well_conditioned(16, 40)])
    batched = soft_spectral_clip(X, 1.0)
    for b, x in zip(batched, X):
        looped = soft_spectral_clip(x, 1.0)
        assert float((b - looped).norm()) <= 2e-5 * float(looped.norm())


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e12, 1e30])
def test_extreme_magnitudes_stay_accurate(scale):
    # X/c is prescaled (and, in one process, rescaled by a power of two), so neither the Gram
    # nor its norms under- or overflow.
    X = well_conditioned(24, 12) * scale
    c = scale  # same relative regime at every scale
    H = soft_spectral_clip(X, c)
    assert torch.isfinite(H).all()
    assert frob_rel_err(H / scale, soft_clip_ref(X.double() / scale, 1.0)) < 1e-4


def test_tiny_singular_values_pass_through():
    X = well_conditioned(20, 10) * 1e-6
    H = soft_spectral_clip(X, 1.0)
    # f(sigma) = sigma (1 - 5e-13) here: the output must equal the input to fp32 accuracy
    assert float((H - X).abs().max()) <= 1e-5 * float(X.abs().max())


def test_more_steps_reuse_the_last_polynomial():
    X = spiky(32, 16).double()
    R = soft_clip_ref(X, 1.0)
    for steps in (10, 11, 14):
        H = soft_spectral_clip(X, 1.0, steps=steps, compute_dtype=torch.float64)
        assert frob_rel_err(H, R) < 1e-8


def test_fewer_steps_follow_the_table_errors():
    # 6 float32 steps leave at most E_6 = 1.5e-3 for normalised values >= 2^-10.
    X = well_conditioned(32, 16)
    H = soft_spectral_clip(X, 1.0, steps=6)
    assert sv_rel_err(H, X, 1.0) < 2e-3


def test_beyond_the_floor_singular_values_follow_mu():
    # sigma_max / c = 1e6 gives s ~ 1e12 > 1/phi = 2^32 (float64 mode): the iteration clips
    # mu I + K instead of I + K, which shrinks the small singular values by up to sqrt(mu)
    # and leaves the large ones alone. Every value must sit between the two curves, with
    # mu <= phi (1 + ||K||_F) / (1 - phi).
    c = 1e-3
    s = torch.linspace(1.0, 1e-4, 16, dtype=torch.float64)
    s[0] = 1e3
    X = matrix_with_spectrum(40, 16, s, seed=5)
    H = soft_spectral_clip(X, c, compute_dtype=torch.float64)
    assert torch.isfinite(H).all()
    phi = 2.0**-32
    kf = float(torch.linalg.matrix_norm(X.mT @ X)) / c**2
    mu_max = phi * (1.0 + kf) / (1.0 - phi)
    got = coordinates_in_singular_basis(H, X)
    upper = soft_clip_scalar(s, c)
    lower = floored_soft_clip_scalar(s, c, mu_max)
    # 1e-6: the float64 table's 4e-10 relative error, carried through mu + sigma^2/c^2
    assert torch.all(got <= upper * (1 + 1e-6)) and torch.all(got >= lower * (1 - 1e-6))
    assert abs(float(got[0] / upper[0]) - 1.0) < 1e-6  # the spike is unaffected
    assert float(got[-1]) < 0.1 * float(upper[-1])  # the smallest one is floored (mu ~ 233)


def test_fp32_never_diverges_on_hopeless_spectra():
    # sigma_max / c up to 1e8 with a rank-1 spike: far beyond what an fp32 Gram resolves. The
    # spectral floor keeps every eigenvalue of Y0 positive, so the result is finite and inside
    # the clip ball; the spike itself is still accurate.
    for m, n in [(2000, 2), (64, 8), (3, 500)]:
        for spike in (1e4, 1e8):
            s = torch.full((min(m, n),), 1e-3, dtype=torch.float64)
            s[0] = spike
            X = matrix_with_spectrum(m, n, s, seed=m + n).float()
            for dtype in (torch.float32, torch.bfloat16):
                H = soft_spectral_clip(X, 0.1, compute_dtype=dtype)
                assert torch.isfinite(H).all()
                sv = torch.linalg.svdvals(H.double())
                assert sv[0] <= 0.1 * 1.03


# --------------------------------------------------------------------------- tensor parallel


def _run_sharded(X: torch.Tensor, c: float, shards: int, dim: int, in_place: bool, dtype=torch.float32):
    """Run one soft clip per shard in its own thread; the all-reduce is a barrier + sum.

    Each rank only ever holds its own slice and, after the single reduction, the summed Gram.
    """
    pieces = list(torch.chunk(X, shards, dim=dim))
    slots: list = [None] * shards
    calls = [0] * shards
    barrier = threading.Barrier(shards, timeout=60)
    results: list = [None] * shards
    errors: list = []

    def make_allreduce(rank):
        def allreduce(G):
            calls[rank] += 1
            slots[rank] = G.clone()
            barrier.wait()
            total = slots[0].clone()
            for other in slots[1:]:
                total += other  # same order on every rank -> identical sums
            barrier.wait()
            if in_place:
                G.copy_(total)
                return None
            return total

        return allreduce

    def worker(rank):
        try:
            results[rank] = soft_spectral_clip(
                pieces[rank], c, allreduce=make_allreduce(rank), partition_dim=dim, compute_dtype=dtype
            )
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(shards)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return torch.cat(results, dim=dim), calls, [s.shape for s in slots]


@pytest.mark.parametrize("shards", [2, 4])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize(
    "case",
    [("well", torch.float32, False), ("spiky", torch.float64, True), ("spiky", torch.float32, False)],
    ids=["well-fp32", "spiky-fp64-inplace", "spiky-fp32"],
)
def test_sharded_equals_unsharded(shards, dim, case):
    kind, dtype, in_place = case
    X = (well_conditioned if kind == "well" else spiky)(48, 40)
    if dtype == torch.float64:
        X = X.double()
    c = 1.0
    H, calls, gram_shapes = _run_sharded(X, c, shards, dim, in_place, dtype)
    assert calls == [1] * shards  # exactly one all-reduce per call
    unsplit = X.shape[1] if dim == 0 else X.shape[0]
    assert all(tuple(s) == (unsplit, unsplit) for s in gram_shapes)  # Gram on the unsplit side
    single = soft_spectral_clip(X, c, partition_dim=dim, compute_dtype=dtype)  # same side, one process
    diff = float((H - single).norm() / single.norm())
    # 1e-5 as briefed; the spiky fp32 case is held to 3e-4, its own fp32 accuracy (see the
    # module docstring of this file), and checked at 1e-5 in float64 instead.
    assert diff < (3e-4 if (kind, dtype) == ("spiky", torch.float32) else 1e-5)
    assert frob_rel_err(H, soft_clip_ref(X, c)) < 1e-3


def test_sharded_batched():
    # Rows split in a batch of two matrices; the reduced tensor is the Gram of X/c (contract
    # documented in soft_spectral_clip), so the emulated all-reduce can be checked exactly.
    X = torch.stack([spiky(32, 24), well_conditioned(32, 24)])
    c = 5.0
    pieces = list(torch.chunk(X, 2, dim=-2))
    total = sum((p / c).mT @ (p / c) for p in pieces)
    outs = []
    for p in pieces:
        def allreduce(G, _p=p):
            own = (_p / c).mT @ (_p / c)
            assert float((G - own).abs().max()) <= 1e-6 * float(own.abs().max())  # its own Gram
            return total.clone()

        outs.append(soft_spectral_clip(p, c, allreduce=allreduce, partition_dim=0))
    H = torch.cat(outs, dim=-2)
    single = soft_spectral_clip(X, c, partition_dim=0)
    assert float((H - single).norm() / single.norm()) < 1e-5


def test_forced_side_agrees_with_automatic_side():
    X = spiky(40, 24)
    a = soft_spectral_clip(X, 1.0)  # Gram on the 24 side
    b = soft_spectral_clip(X, 1.0, partition_dim=1)  # Gram forced onto the 40 side
    assert frob_rel_err(b, soft_clip_ref(X, 1.0)) < 1e-3
    assert float((a - b).norm() / a.norm()) < 1e-4


# --------------------------------------------------------------------------- hard clip


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("c", LEVELS)
def test_hard_clip_caps_at_c_and_keeps_vectors(shape, c):
    X = spiky(*shape)
    H = hard_spectral_clip(X, c)
    assert H.shape == X.shape and H.dtype == X.dtype
    R = hard_clip_ref(X, c)
    assert float((H.double() - R).norm() / R.norm()) < 1e-5
    assert float(torch.linalg.svdvals(H.double())[0]) <= c * (1 + 1e-5)


def test_hard_clip_leaves_small_singular_values_alone():
    X = spiky(32, 20)  # sigma in [0.05, 0.5] plus 50
    H = hard_spectral_clip(X, 1.0)
    S = torch.linalg.svdvals(X.double())
    got = coordinates_in_singular_basis(H, X)
    assert float(((got[1:] - S[1:]).abs() / S[1:]).max()) < 1e-5
    assert abs(float(got[0]) - 1.0) < 1e-5
    # everything below c: returned unchanged, bit for bit
    Y = well_conditioned(24, 12)
    assert torch.equal(hard_spectral_clip(Y, 2.0), Y)
    Yb = Y.bfloat16()
    assert torch.equal(hard_spectral_clip(Yb, 2.0), Yb)


def test_hard_clip_float64():
    X = spiky(24, 16).double()
    H = hard_spectral_clip(X, 0.3)
    assert H.dtype == torch.float64
    assert frob_rel_err(H, hard_clip_ref(X, 0.3)) < 1e-12


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "5", None])
def test_bad_threshold_is_a_value_error_naming_it(bad):
    X = torch.randn(4, 3)
    for clip in (soft_spectral_clip, hard_spectral_clip):
        with pytest.raises(ValueError, match=r"\bc\b") as info:
            clip(X, bad)
        assert repr(bad) in str(info.value)


def test_bad_inputs_are_value_errors():
    with pytest.raises(ValueError, match=r"\(5,\)"):
        soft_spectral_clip(torch.randn(5), 1.0)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        hard_spectral_clip(torch.randn(5), 1.0)
    with pytest.raises(ValueError, match="int64"):
        soft_spectral_clip(torch.ones(3, 3, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="float16"):
        soft_spectral_clip(torch.randn(3, 3), 1.0, compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="bfloat16"):
        hard_spectral_clip(torch.randn(3, 3), 1.0, compute_dtype=torch.bfloat16)
    for steps in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=repr(steps).replace(".", r"\.")):
            soft_spectral_clip(torch.randn(3, 3), 1.0, steps=steps)
    with pytest.raises(ValueError, match="partition_dim"):
        soft_spectral_clip(torch.randn(3, 3), 1.0, partition_dim=2)
    with pytest.raises(ValueError, match="partition_dim"):
        soft_spectral_clip(torch.randn(3, 3), 1.0, allreduce=lambda g: g)
    with pytest.raises(ValueError, match="shape"):
        soft_spectral_clip(torch.randn(4, 3), 1.0, allreduce=lambda g: g[:1], partition_dim=0)


# --------------------------------------------------------------------------- constants


@pytest.mark.parametrize("name", sorted(SOFT_CLIP_COEFFICIENTS))
def test_coefficient_tables_regenerate(name):
    ell, delta = SOFT_CLIP_DESIGN[name]
    coeffs, errors = design_soft_clip_coefficients(ell, delta, len(SOFT_CLIP_COEFFICIENTS[name]))
    for got, want in zip(coeffs, SOFT_CLIP_COEFFICIENTS[name]):
        for g, w in zip(got, want):
            assert math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-12)
    assert len(SOFT_CLIP_COEFFICIENTS[name]) == DEFAULT_SOFT_CLIP_STEPS
    assert errors[-1] < 1e-4  # every table has converged within the default 10 steps


def test_tables_converge_in_exact_arithmetic():
    # Apply each composed polynomial to scalars across its design interval [ell, 1].
    for name, table in SOFT_CLIP_COEFFICIENTS.items():
        ell, _ = SOFT_CLIP_DESIGN[name]
        x = torch.logspace(math.log10(ell), 0.0, 200, dtype=torch.float64)
        for a, b, c in table:
            x = a * x + b * x**3 + c * x**5
        assert float((x - 1).abs().max()) < 1e-4, name


def test_spectra_update_scale():
    assert spectra_update_scale(4096, 1024) == 2.0
    assert spectra_update_scale(1024, 4096) == 1.0
    assert spectra_update_scale(7, 7) == 1.0
    for bad in [(0, 3), (3, -1), (2.5, 1), (True, 1)]:
        with pytest.raises(ValueError, match="positive integer"):
            spectra_update_scale(*bad)


# --------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 20),
    n=st.integers(1, 20),
    c=st.sampled_from(LEVELS),
    log_ratio=st.floats(-2.0, 2.5),
    seed=st.integers(0, 2**16),
)
def test_property_soft_clip_matches_svd(m, n, c, log_ratio, seed):
    # Gaussian matrices (condition numbers up to ~1e3, near-zero singular values included)
    # with sigma_max / c in [1e-2, 10^2.5]: s <= 1.5e5 stays below the fp32 floor's 1e6, so
    # every singular value is promised to 1%.
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = (G / torch.linalg.matrix_norm(G, 2) * (c * 10.0**log_ratio)).float()
    H = soft_spectral_clip(X, c)
    target = soft_clip_scalar(torch.linalg.svdvals(X.double()), c)
    got = coordinates_in_singular_basis(H, X)
    # relative 1% per value, plus an absolute 1e-5 * max f for values in fp32's noise
    assert torch.all((got - target).abs() <= 1e-2 * target + 1e-5 * target.max())
    sigma_max = float(torch.linalg.svdvals(X.double())[0])
    assert float(torch.linalg.svdvals(H.double())[0]) <= min(c, sigma_max) * (1 + 1e-4)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 16), n=st.integers(1, 16), c=st.floats(0.05, 20.0), seed=st.integers(0, 2**16))
def test_property_hard_clip(m, n, c, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(m, n, generator=g) * 3.0
    H = hard_spectral_clip(X, c)
    S = torch.linalg.svdvals(X.double())
    err = float((torch.linalg.svdvals(H.double()) - S.clamp_max(c)).abs().max())
    assert err <= 1e-5 * max(1.0, float(S[0]))
