"""The Lagrange multiplier of the SSO step: the root of ``h(lambda) = <Theta, msign(M + lambda Theta)>``.

The steepest-descent direction on the spectral sphere is ``Phi = msign(M + lambda* Theta)`` with
``Theta = u v^T`` and ``lambda*`` chosen so that ``Phi`` is tangent to the sphere:
``<Theta, Phi> = u^T Phi v = 0``. ``h`` is non-decreasing in ``lambda``, runs from -1 to +1, and
its root obeys ``|lambda*| <= 2 ||M||_*`` (paper App. A.2); for a Frobenius-normalised ``M`` of
rank ``r`` that bound is at most ``2 sqrt(r)``.

``Theta`` is never formed: ``M + lambda u v^T`` is one fused rank-1 update of ``M`` and
``<Theta, X> = u^T X v`` is two matrix-vector products.

Two solvers share one evaluation function:

* :func:`solve_lambda_bisect` — the paper's reference: from 0, bracket outward with step
  1e-3 doubled up to 10 times, then bisect to ``|h| <= tol``; fall back to ``lambda = 0`` when
  no bracket is found. It needs ~8.9 msign calls per matrix at tol 1e-4 (paper §7) and reads
  ``h`` on the host after every evaluation. Kept for comparison and as a trusted reference.
* :func:`solve_lambda_secant` — ours: warm-started from last step's root and slope, a fixed
  number of safeguarded secant evaluations (2 by default), batched over matrices, all control
  flow on the device (``torch.where``, no ``.item()``). The best evaluated point is returned
  with its msign, so the final direction is never recomputed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .newton_schulz import AllReduce, _fused_add_matmul

Tensor = torch.Tensor
MsignFn = Callable[[Tensor], Tensor]

REFERENCE_STEP = 1e-3
"""First bracketing step of the reference solver (SSO fork's bisection; SPEC §2 step 5)."""
REFERENCE_DOUBLINGS = 10
"""Bracket doublings of the reference solver before it gives up and returns lambda = 0."""
NEWTON_OVERSHOOT = 1.5
"""The secant solver's first step goes 1.5x the Newton step from the warm start, so that the
root is usually bracketed and the final interpolation is one, not an extrapolation. Chosen on
recorded training trajectories of a byte-level GPT (``scripts/solver_study.py``): with 1.0, 3%
of steps ended unbracketed; with 1.5, none did."""
SLOPE_MIN_DH = 1e-4
"""Smallest ``|h_b - h_a|`` from which a secant slope is kept for the next step: half the
tolerance 2e-4, far above fp32 round-off of ``h`` (~1e-7). Measured: without it, a converged
4-evaluation cold solve stored a round-off slope that differed 8-15% between tensor-parallel
and single-process runs, and the next step's weights by ~1e-4."""
ONE_EVAL_GAIN = 0.5
"""Damping of the one-evaluation solver's Newton update of lambda. The cached slope is a
secant over a bracket, which under-estimates ``h'`` at the root by up to ~3x on recorded
trajectories (``h`` is sigmoid-shaped), and an undamped update with a slope under-estimated by
more than 2x oscillates with growing amplitude; with 0.5 the loop stays stable up to 4x."""
EXTRAPOLATION_RANGE = (-3.0, 4.0)
"""Limits of the interpolation weight ``t`` when the root was not bracketed (see
:func:`solve_lambda_secant`); inside a bracket ``t`` lies in ``[0, 1]`` by construction."""


def uv_inner(X: Tensor, u: Tensor, v: Tensor, allreduce: Optional[AllReduce] = None) -> Tensor:
    """``<u v^T, X> = u^T X v`` per matrix (shape ``(...)``), summed over shards if sharded."""
    partial = (u.unsqueeze(-2) @ X.to(u.dtype) @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    return allreduce(partial) if allreduce is not None else partial


def add_rank1(M: Tensor, u: Tensor, v: Tensor, lam: Tensor) -> Tensor:
    """``M + lam * u v^T`` as one fused (batched) rank-1 product; ``lam`` has shape ``(...)``."""
    lu = (lam.to(u.dtype).unsqueeze(-1) * u).unsqueeze(-1).to(M.dtype)
    return _fused_add_matmul(M, lu, v.unsqueeze(-2).to(M.dtype), 1.0, 1.0)


@dataclass
class TangentResidual:
    """Evaluates ``h(lambda)`` and ``msign(M + lambda Theta)`` for fixed ``M, u, v``.

    The solvers see an evaluation's direction only through this class's methods (select,
    combine, project, materialise), so another representation of the same direction can
    stand in (:class:`megatron_sso.ops.gram_residual.GramTangentResidual` keeps the small
    left factor instead of the full matrix). Here the representation is the msign itself.
    ``calls`` counts msign evaluations per matrix, so solvers are compared by real cost.
    """

    M: Tensor
    u: Tensor
    v: Tensor
    msign_fn: MsignFn
    allreduce: Optional[AllReduce] = None
    partition_dim: Optional[int] = None
    calls: int = 0

    def __call__(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        phi = self.msign_fn(add_rank1(self.M, self.u, self.v, lam))
        self.calls += 1
        return self.inner(phi), phi

    def inner(self, rep: Tensor) -> Tensor:
        """``h = <Theta, direction>`` (fp32, shape ``(...)``)."""
        return uv_inner(rep, self.u, self.v, self.allreduce).float()

    @staticmethod
    def select(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return torch.where(mask.view(mask.shape + (1, 1)), a, b)

    @staticmethod
    def combine(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
        """``(1 - t) a + t b`` per matrix."""
        return a + t.view(t.shape + (1, 1)).to(a.dtype) * (b - a)

    def project(self, rep: Tensor, h: Tensor) -> Tensor:
        """``direction - h Theta`` (``Theta`` has unit Frobenius norm)."""
        return add_rank1(rep, self.u, self.v, -h)

    def materialise(self, rep: Tensor) -> Tensor:
        return rep

    def cold_slope(self, rep: Tensor) -> Tensor:
        return cold_slope(self, rep)


@dataclass
class LambdaSolution:
    """A solver's answer per matrix: ``lam``, ``h = h(lam)``, ``phi = msign(M + lam Theta)``,
    the secant slope to warm-start the next step with, and msign calls spent per matrix."""

    lam: Tensor
    h: Tensor
    phi: Tensor
    slope: Tensor
    calls: int
    fallback: Optional[Tensor] = None
    """Per matrix: whether the secant solver fell back to the tangent projection."""
    h_raw: Optional[Tensor] = None
    """Per matrix: the smallest ``|h|`` of an msign the solver really evaluated (before any
    interpolation or projection, which make ``h`` zero by construction): how far from
    tangent the best *computed* direction was. ``None``: same as ``|h|``."""


def lambda_bound(m: int, n: int) -> float:
    """Upper bound on ``|lambda*|`` for a Frobenius-normalised ``m x n`` ``M``: ``2 sqrt(min(m, n))``.

    From ``|lambda*| <= 2 ||M||_*`` (paper App. A.2) and ``||M||_* <= sqrt(rank) ||M||_F``.
    """
    return 2.0 * math.sqrt(min(m, n))


def _contract(x: Tensor, split: bool, allreduce: Optional[AllReduce]) -> Tensor:
    return allreduce(x) if split and allreduce is not None else x


def cold_slope(residual: TangentResidual, phi0: Tensor) -> Tensor:
    """First-step estimate of ``h'(lambda)`` from the msign ``phi0`` of ``M`` itself.

    ``h'`` is, to first order, a weighted mean of ``1 / s_i`` over the singular values of
    ``M`` (the polar factor's derivative), so its scale is one over a typical singular value
    as seen from ``u`` and ``v``: ``p = u^T (M M^T)^{1/2} u = <M^T u, phi0^T u>`` and
    ``q = v^T (M^T M)^{1/2} v = <M v, phi0 v>`` (as ``(M M^T)^{1/2} = M phi0^T``). The guess is
    ``1 / sqrt(p q)``. On recorded byte-level-GPT momenta the true slope was 1-22x this
    guess, so the first Newton step overshoots and brackets the root.
    """
    M, u, v, ar, pd = residual.M, residual.u, residual.v, residual.allreduce, residual.partition_dim
    Mt_u = _contract((M.mT.to(u.dtype) @ u.unsqueeze(-1)).squeeze(-1), pd == 0, ar)
    Pt_u = _contract((phi0.mT.to(u.dtype) @ u.unsqueeze(-1)).squeeze(-1), pd == 0, ar)
    M_v = _contract((M.to(v.dtype) @ v.unsqueeze(-1)).squeeze(-1), pd == 1, ar)
    P_v = _contract((phi0.to(v.dtype) @ v.unsqueeze(-1)).squeeze(-1), pd == 1, ar)
    p = _contract((Mt_u * Pt_u).sum(-1), pd == 1, ar)
    q = _contract((M_v * P_v).sum(-1), pd == 0, ar)
    return 1.0 / (p * q).clamp_min(1e-30).sqrt().float()


def initial_slope(m: int, n: int) -> float:
    """A cold-start guess for ``h'(lambda)`` of a Frobenius-normalised ``M``: ``sqrt(min(m, n))``.

    To first order ``h'`` is a weighted mean of ``1 / s_i`` over ``M``'s singular values
    ``s_i`` (the polar factor's derivative), and a flat spectrum of unit Frobenius norm has
    ``s_i = 1 / sqrt(r)``. Only the first step uses it; later steps use the measured slope.
    """
    return math.sqrt(min(m, n))


def solve_lambda_bisect(
    residual: TangentResidual,
    tol: float = 2e-4,
    max_iter: int = 20,
    step: float = REFERENCE_STEP,
    doublings: int = REFERENCE_DOUBLINGS,
) -> LambdaSolution:
    """Reference bracket-and-bisect for ONE matrix (``M`` of shape ``(m, n)``).

    Every evaluation is read on the host. ``max_iter`` caps the bisection steps (the
    bracketing evaluations come on top, as in the reference).
    """
    if residual.M.dim() != 2:
        raise ValueError(f"the reference solver takes one matrix, got shape {tuple(residual.M.shape)}")
    dev = residual.M.device
    zero = torch.zeros((), device=dev)
    h0, phi0 = residual(zero)
    best = (zero, h0, phi0)
    calls_before = residual.calls - 1
    if abs(h0.item()) <= tol:
        return LambdaSolution(zero, h0, residual.materialise(phi0), torch.tensor(float("nan"), device=dev), 1)
    direction = -1.0 if h0.item() > 0 else 1.0  # h is non-decreasing: walk against its sign
    lo = zero
    hi = None
    t = step
    for _ in range(doublings + 1):
        lam = torch.tensor(direction * t, device=dev)
        h, phi = residual(lam)
        if abs(h.item()) < abs(best[1].item()):
            best = (lam, h, phi)
        if abs(h.item()) <= tol:
            return LambdaSolution(lam, h, residual.materialise(phi), torch.tensor(float("nan"), device=dev),
                                  residual.calls - calls_before)
        if (h.item() > 0) != (h0.item() > 0):
            hi = lam
            break
        lo = lam
        t *= 2.0
    if hi is None:  # no sign change: fall back to a MuonSphere step, as the reference does
        return LambdaSolution(zero, h0, residual.materialise(phi0), torch.tensor(float("nan"), device=dev),
                              residual.calls - calls_before)
    a, b = lo, hi
    for _ in range(max_iter):
        mid = 0.5 * (a + b)
        h, phi = residual(mid)
        if abs(h.item()) < abs(best[1].item()):
            best = (mid, h, phi)
        if abs(h.item()) <= tol:
            break
        if (h.item() > 0) == (h0.item() > 0):
            a = mid
        else:
            b = mid
    lam, h, phi = best
    return LambdaSolution(lam, h, residual.materialise(phi), torch.tensor(float("nan"), device=dev),
                          residual.calls - calls_before)


def solve_lambda_secant(
    residual: TangentResidual,
    lam0: Tensor,
    slope0: Optional[Tensor],
    evals: int = 2,
    bound: Optional[float] = None,
    interpolate: bool = True,
    tol: Optional[float] = None,
    tol_evals: int = 0,
) -> LambdaSolution:
    """Warm-started, safeguarded secant with a fixed evaluation budget, batched, sync-free.

    Args:
        residual: the batched evaluation ``lambda -> (h, msign)``.
        lam0: start point per matrix (last step's root; 0 on the first step).
        slope0: estimate of ``h'`` per matrix (last step's secant slope); ``None`` on a
            cold start estimates it from the first evaluation (:func:`cold_slope`).
        evals: msign evaluations per matrix (>= 1). With one, the warm start's msign is
            projected onto the tangent space and lambda takes a Newton step for the next call
            (:func:`_project_single`). Otherwise the first is at the warm start, the
            second :data:`NEWTON_OVERSHOOT` times the Newton step with the cached slope,
            later ones secant steps kept inside
            the bracket found so far (regula falsi when the secant leaves it).
        bound: the initial bracket half-width; default :func:`lambda_bound` of ``M``'s
            shape (a tensor-parallel caller passes the full matrix's bound).
        interpolate: finish with the *tangent interpolation* (below); otherwise return the
            evaluated point of smallest ``|h|``.
        tol, tol_evals: after the ``evals`` evaluations, up to ``tol_evals`` more, each one
            for a matrix only while its best evaluated ``|h|`` (``h_raw``) is above ``tol``.
            The count is fixed, so no host sync: every further msign is computed for the whole
            batch, applied with ``torch.where`` only where needed, and counted in ``calls``.
            Why: interpolating between two points of a steep ``h`` (a momentum aligned with
            ``u v^T`` makes ``h`` a near step) gives ``h = 0`` by construction yet a direction
            far from the exact one; ``h_raw`` shows it and the further evaluations fix it.

    Tangent interpolation: ``h`` is linear in the msign output, so for two evaluated points
    ``(l_a, Phi_a)``, ``(l_b, Phi_b)`` the combination ``Phi = (1-t) Phi_a + t Phi_b`` with
    ``t = h_a / (h_a - h_b)`` has ``<Theta, Phi> = 0`` exactly, and differs from
    ``msign(M + l Theta)`` at ``l = l_a + t (l_b - l_a)`` only to second order in
    ``l_b - l_a``. The pair is the tightest bracket found (or the last two points when
    the root was not bracketed; when ``t`` falls outside :data:`EXTRAPOLATION_RANGE` the
    direction is instead projected onto the tangent space and ``fallback`` is set). No msign is recomputed: the answer reuses both.
    The returned ``h`` is measured on the returned direction (zero by construction when
    interpolated); ``h_raw`` is the smallest ``|h|`` of a real msign the solver evaluated, the
    accuracy figure that can be large.
    """
    if int(evals) != evals or evals < 1:
        raise ValueError(f"secant solver needs at least one evaluation, got evals={evals!r}")
    if int(tol_evals) != tol_evals or tol_evals < 0:
        raise ValueError(f"tol_evals must be a non-negative integer, got {tol_evals!r}")
    if tol_evals and not (tol is not None and tol > 0):
        raise ValueError(f"tol_evals={tol_evals} needs a positive tol, got tol={tol!r}")
    if bound is None:
        bound = lambda_bound(residual.M.size(-2), residual.M.size(-1))
    lam = lam0.float().clamp(-bound, bound)
    h, phi = residual(lam)
    slope = residual.cold_slope(phi) if slope0 is None else slope0.float()
    where3 = residual.select

    if evals == 1:
        return _project_single(residual, lam, h, phi, slope, bound)

    best = (lam, h, phi)
    # Tightest bracket seen so far; the +-bound ends carry h = -+1 and no msign yet.
    lo, h_lo, phi_lo = torch.full_like(lam, -bound), torch.full_like(lam, -1.0), phi
    hi, h_hi, phi_hi = torch.full_like(lam, bound), torch.full_like(lam, 1.0), phi
    has_lo = torch.zeros_like(lam, dtype=torch.bool)
    has_hi = torch.zeros_like(lam, dtype=torch.bool)
    prev = None
    for k in range(int(evals) + int(tol_evals)):
        # a further evaluation (k >= evals) changes only the matrices still above tol
        need = None if k < evals else best[1].abs() > tol
        if k > 0:
            state = (lam, h, phi, slope, prev, best, lo, h_lo, phi_lo, hi, h_hi, phi_hi, has_lo, has_hi)
            nxt = lam - (NEWTON_OVERSHOOT if k == 1 else 1.0) * h / slope
            falsi = lo - h_lo * (hi - lo) / (h_hi - h_lo).clamp_min(1e-12)
            nxt = torch.where((nxt > lo) & (nxt < hi), nxt, falsi)
            nxt = torch.where(h == 0, lam, nxt)
            h_new, phi_new = residual(nxt)
            dl = nxt - lam
            sec = (h_new - h) / torch.where(dl == 0, torch.ones_like(dl), dl)
            # A slope from two h values that differ by less than SLOPE_MIN_DH is round-off
            # (it happens once the solve has converged) and would make the next step's
            # Newton step, and so the trajectory, depend on summation order (e.g. TP size).
            usable = ((h_new - h).abs() > SLOPE_MIN_DH) & (sec > 0) & torch.isfinite(sec)
            slope = torch.where(usable, sec, slope)
            prev = (lam, h, phi)
            lam, h, phi = nxt, h_new, phi_new
            better = h.abs() < best[1].abs()
            best = (torch.where(better, lam, best[0]), torch.where(better, h, best[1]),
                    where3(better, phi, best[2]))
        new_lo = h <= 0
        lo, h_lo, phi_lo = torch.where(new_lo, lam, lo), torch.where(new_lo, h, h_lo), where3(new_lo, phi, phi_lo)
        new_hi = h >= 0
        hi, h_hi, phi_hi = torch.where(new_hi, lam, hi), torch.where(new_hi, h, h_hi), where3(new_hi, phi, phi_hi)
        has_lo, has_hi = has_lo | new_lo, has_hi | new_hi
        if need is not None:
            (lam, h, phi, slope, prev, best, lo, h_lo, phi_lo, hi, h_hi, phi_hi, has_lo, has_hi) = _keep_where(
                need, where3, (lam, h, phi, slope, prev, best, lo, h_lo, phi_lo, hi, h_hi, phi_hi, has_lo, has_hi),
                state, _STATE_IS_DIRECTION)
    calls = int(evals) + int(tol_evals)
    h_raw = best[1].abs()

    if not interpolate or prev is None:
        return LambdaSolution(best[0], best[1], residual.materialise(best[2]), slope, calls, h_raw=h_raw)
    bracketed = has_lo & has_hi
    la = torch.where(bracketed, lo, prev[0])
    ha = torch.where(bracketed, h_lo, prev[1])
    pa = where3(bracketed, phi_lo, prev[2])
    lb = torch.where(bracketed, hi, lam)
    hb = torch.where(bracketed, h_hi, h)
    pb = where3(bracketed, phi_hi, phi)
    dh = ha - hb
    t = torch.where(dh != 0, ha / torch.where(dh != 0, dh, torch.ones_like(dh)), torch.zeros_like(dh))
    lo_t, hi_t = EXTRAPOLATION_RANGE
    fallback = ~bracketed & ((t < lo_t) | (t > hi_t) | (dh == 0))
    t = torch.where(bracketed, t.clamp(0.0, 1.0), t.clamp(lo_t, hi_t))
    phi_c = residual.combine(pa, pb, t)
    lam_c = la + t * (lb - la)
    h_c = residual.inner(phi_c)
    # Fallback when the root lies far outside the two points (a sudden jump of lambda*,
    # ~1% of steps on recorded GPT runs): project the direction onto the tangent space,
    # Phi <- Phi - h Theta (Theta has unit Frobenius norm), a first-order answer that the
    # stats count, instead of a third msign.
    phi_c = where3(fallback, residual.project(phi_c, h_c), phi_c)
    h_c = torch.where(fallback, residual.inner(phi_c), h_c)
    return LambdaSolution(lam_c, h_c, residual.materialise(phi_c), slope, calls, fallback, h_raw)


_STATE_IS_DIRECTION = (False, False, True, False, (False, False, True), (False, False, True),
                       False, False, True, False, False, True, False, False)
"""Which entries of the secant solver's state (as :func:`solve_lambda_secant` lists it for
:func:`_keep_where`) are directions (in the residual's own representation) rather than
per-matrix tensors."""


def _keep_where(need: Tensor, where3, new: tuple, old: tuple, is_direction: tuple) -> tuple:
    """Per matrix, ``new`` where ``need`` else ``old``, entry by entry (nested tuples of solver
    state); a direction goes through ``where3``, which the residual's representation defines."""
    out = []
    for a, b, d in zip(new, old, is_direction):
        if isinstance(d, tuple):
            out.append(_keep_where(need, where3, a, b, d))
        else:
            out.append(where3(need, a, b) if d else torch.where(need, a, b))
    return tuple(out)


def _project_single(residual: TangentResidual, lam: Tensor, h: Tensor, phi: Tensor, slope: Tensor,
                    bound: float) -> LambdaSolution:
    """The one-evaluation answer: ``Phi(lam0) - h(lam0) Theta`` and a Newton estimate of the root.

    The direction is tangent (``h = 0`` up to round-off) but is ``msign`` of no matrix: it
    differs from the exact SSO direction to first order in ``lambda* - lam0``. Measured on a
    byte-level GPT (``scripts/solver_study.py --accuracy``), it keeps about 70% of the change
    that SSO makes to MuonSphere's direction (median), against ~98% for two evaluations; it
    exists for runs where one msign per step matters more than that. The returned ``lam`` is
    ``lam0 - h / slope`` with the cached slope, the next call's warm start.
    """
    phi_t = residual.project(phi, h)
    lam_next = (lam - ONE_EVAL_GAIN * h / slope).clamp(-bound, bound)
    return LambdaSolution(lam_next, residual.inner(phi_t), residual.materialise(phi_t), slope, 1, h_raw=h.abs())
