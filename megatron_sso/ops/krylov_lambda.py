"""SSO at MuonSphere's cost: lambda* from a shared Krylov space, then ONE msign.

Every ``h(lambda)`` of a step lives in one block Krylov space (:mod:`.krylov_space`). Projected
onto its basis ``Q`` (``2k`` columns), ``X X^T`` becomes the small
``C(lambda) = T + P S(lambda) P^T`` with ``P = [a~, w~]`` (``a~ = Q^T a``, ``w~ = Q^T w``) and
``S = [[lambda^2, lambda], [lambda, 0]]``, and

    h~(lambda) = a~^T C(lambda)^(-1/2) (w~ + lambda a~),

which is exactly SSO's ``h`` for the compressed matrix ``Q^T Y`` (so it is monotone, runs
from -1 to 1, and equals ``h`` when ``2k >= p``). The inverse square root is the Stieltjes
integral ``x^(-1/2) = (2/pi) int_0^inf dt / (x + t^2)``; with ``T = V diag(theta) V^T`` (one
small ``eigh`` per matrix and step) each resolvent's ``P``-block is the ``2 x 2``
``H_t = P^T V diag(1 / (theta + t^2)) V^T P``, and by the push-through identity

    P^T (C(lambda) + t^2)^(-1) P = H_t (I + S(lambda) H_t)^(-1),

so one evaluation of ``h~`` (and of its derivative) is a sum of ``2 x 2`` inverses over the
quadrature nodes: a Newton solve to float64 precision costs far less than one matrix product.

The nodes are ``t = ||Y||_F e^s`` on a uniform grid in ``s`` (trapezoid rule: the integrand
is ``sech(s - ln(x)/2) / (2 sqrt(x))``, analytic in a strip of half-width ``pi/2``, so the
error is ``~exp(-pi^2 / ds)``: 3e-9 at ``ds = 0.5``). The grid starts at
:data:`NODE_FLOOR` ``* ||Y||_F``: that truncation is a regularisation -- singular values far
below it (the zero ones of a rank-deficient ``M``) map to ~0, as Newton-Schulz maps them.
Newton-Schulz itself is not the polar factor: it maps a singular value ``s`` of the normalised
matrix to ~6364 s below 1e-4 (paper's set), and a nearly low-rank momentum has most of its
singular values there (a byte-level GPT at width 256: 174 of 256 below 1e-3), where the exact
polar root and the iteration's root differ completely. So by default the weights are fitted to
the configured iteration's own map (:func:`ns_node_weights`) and the model is Newton-Schulz's.

:func:`solve_lambda_krylov` then computes ``Phi = msign(M + lambda~ Theta)`` once, measures its
``h`` exactly (``u^T Phi v``), and removes what is left with the tangent projection
``Phi <- Phi - h Theta`` (the secant solver's fallback): a first-order correction of the
model's and Newton-Schulz's errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .krylov_space import KrylovBasis, krylov_basis, krylov_blocks_for, orient
from .lambda_solver import LambdaSolution, add_rank1, uv_inner
from .krylov_weights import SSO8_WEIGHTS
from .newton_schulz import NORM_EPS, AllReduce, resolve_coefficients

Tensor = torch.Tensor

NODE_FLOOR = 1e-7
"""Smallest quadrature node relative to ``||Y||_F``. For the exact polar model, a singular value
``s`` (of the normalised matrix) maps to ``(2/pi) arctan(s / 1e-7)`` instead of 1 (1 - 6e-5 at
1e-3); zero singular values of a rank-deficient ``M`` map to 0, as Newton-Schulz maps them."""
NODE_TOP = 1e8
"""Largest node relative to ``||Y||_F``: the polar model's tail left out is ``(2/pi) s / 1e8`` of
``x^(-1/2)`` (below 2e-7 for every ``|lambda| <= bound`` of a matrix up to 2^14 on a side)."""
NODE_STEP = 0.5
"""Spacing of the nodes in ``s = ln t``: the integrand is ``sech(s - ln(x)/2) / (2 sqrt(x))``,
analytic in a strip of half-width pi/2, so the trapezoid rule's relative error is
``exp(-pi^2 / 0.5) = 3e-9``. 70 nodes from 1e-7 to 1e8."""
NEWTON_ITERS = 48
"""Safeguarded Newton steps on ``h~`` (:func:`solve_model`). Each is ~20 element-wise operations
on ``(B, nodes)`` tensors, so a fixed, generous count costs little: in the worst case (bisection
every other step) the bracket ``2 bound`` shrinks by ``2^-24`` (6e-7 for a 64 x 64 matrix)."""

NS_FIT_WEIGHT = 1e4
"""Weight of the singular values ``s >= 1e-3`` (of the normalised matrix) in the fit of
:func:`ns_node_weights`, against 1 below. Measured on the paper's 8-step set: the fitted map then
matches Newton-Schulz's to 5e-7 above 1e-3 and 2.7e-3 (relative) below 1e-5, and within 4% in
between, where it turns from linear to 1 (weights 1e2 / 1e3: 2.8e-4 / 4.1e-5 above 1e-3)."""

MsignFn = Callable[[Tensor], Tensor]


def node_grid(device=None) -> Tensor:
    """The quadrature nodes ``tau_j`` (float64, relative to ``||Y||_F``), made on ``device``
    (``None``: the host): a host grid copied to the GPU every step would wait for it."""
    return torch.arange(math.log(NODE_FLOOR), math.log(NODE_TOP) + NODE_STEP / 2, NODE_STEP,
                        dtype=torch.float64, device=device).exp()


def ns_node_weights(table: Optional[Sequence[tuple[float, float, float]]], device=None) -> Tensor:
    """Quadrature weights ``w_j`` with ``sum_j w_j / (x + tau_j^2) ~ g(x)`` on :func:`node_grid`.

    The exact polar factor, ``g(x) = x^(-1/2)``: the trapezoid weights ``(2/pi) ds tau_j``. For the
    paper's 8-step Newton-Schulz set, ``g(x) = phi(sqrt(x)) / sqrt(x)`` with ``phi`` its scalar map
    (what msign does to each singular value of the Frobenius-normalised matrix: ~6364 s below
    1e-4, 1 above 1e-3): the weights fitted by ``scripts/fit_krylov_weights.py`` (non-negative
    least squares), :data:`SSO8_WEIGHTS`. Other sets (``table`` not the paper's) get the polar
    weights; the tangent projection then absorbs the difference.
    """
    tau = node_grid(device)
    if table is not None and [tuple(t) for t in table] == [tuple(t) for t in resolve_coefficients("sso8", None)]:
        return torch.tensor(SSO8_WEIGHTS, dtype=torch.float64, device=device)
    return (2.0 / math.pi) * NODE_STEP * tau


@dataclass
class LambdaModel:
    """``h~`` of one batch in quadrature form: nodes' weights and the ``2 x 2`` blocks ``H_t``."""

    weights: Tensor
    """``(..., N)``: ``(2/pi) * ds * t``."""
    H: Tensor
    """``(..., N, 2, 2)``: ``P^T (T + t^2)^(-1) P``."""

    @classmethod
    def from_basis(cls, basis: KrylovBasis, bound: float,
                   table: Optional[Sequence[tuple[float, float, float]]] = None) -> "LambdaModel":
        """The model of ``basis``: exact polar factor (``table=None``) or the Newton-Schulz
        steps ``table`` (:func:`ns_node_weights`)."""
        theta, V = torch.linalg.eigh(basis.T)
        theta = theta.clamp_min(0.0)
        P = V.mT @ torch.stack([basis.a_t, basis.w_t], dim=-1)  # (..., 2k, 2)
        scale = basis.sq.clamp_min(0).sqrt() + NORM_EPS
        tau = node_grid(theta.device)
        w = ns_node_weights(table, theta.device)
        t = scale.unsqueeze(-1) * tau  # (..., N)
        d = 1.0 / (theta.unsqueeze(-2) + t.unsqueeze(-1).square())  # (..., N, 2k)
        H = torch.einsum("...ia,...ni,...ib->...nab", P, d, P)
        return cls(weights=scale.unsqueeze(-1) * w, H=H)

    def __call__(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        """``h~(lam)`` and ``dh~/dlam`` per matrix (``lam``: ``(...)``, float64)."""
        H = self.H
        l_ = lam.unsqueeze(-1)  # (..., 1) broadcasts over nodes
        h11, h12, h22 = H[..., 0, 0], H[..., 0, 1], H[..., 1, 1]
        # I + S H with S = [[l^2, l], [l, 0]]
        m11 = 1 + l_ * l_ * h11 + l_ * h12
        m12 = l_ * l_ * h12 + l_ * h22
        m21 = l_ * h11
        m22 = 1 + l_ * h12
        det = m11 * m22 - m12 * m21
        # K = H (I + S H)^-1, symmetric
        k11 = (h11 * m22 - h12 * m21) / det
        k12 = (h12 * m11 - h11 * m12) / det
        k22 = (h22 * m11 - h12 * m12) / det
        # h = e1^T K r, r = [l, 1];  dh = -e1^T K S' K r + K11, S' = [[2l, 1], [1, 0]]
        g = k11 * l_ + k12
        kr1, kr2 = g, k12 * l_ + k22  # K r
        sk1 = 2 * l_ * kr1 + kr2  # S' K r
        sk2 = kr1
        dg = k11 - (k11 * sk1 + k12 * sk2)
        return (self.weights * g).sum(-1), (self.weights * dg).sum(-1)


def solve_model(model: LambdaModel, lam0: Tensor, bound: float, iters: int = NEWTON_ITERS) -> tuple[Tensor, Tensor]:
    """Root of ``h~`` in ``[-bound, bound]``: ``(lam, slope at lam)``.

    Newton kept safe as in Numerical Recipes' ``rtsafe``: a step is taken only if it stays
    inside the bracket and is at most half the previous one; otherwise the bracket is bisected.
    So every two iterations at least halve the step, even where ``h~`` is nearly a step
    function (a singular value of ``M + lambda Theta`` crossing zero near the root).
    """
    lam = lam0.double().clamp(-bound, bound)
    lo = torch.full_like(lam, -bound)
    hi = torch.full_like(lam, bound)
    dx_old = torch.full_like(lam, 2 * bound)
    for _ in range(iters):
        h, dh = model(lam)
        lo = torch.where(h <= 0, lam, lo)
        hi = torch.where(h >= 0, lam, hi)
        newton = lam - h / torch.where(dh > 0, dh, torch.ones_like(dh))
        ok = ((dh > 0) & (newton > lo) & (newton < hi) & torch.isfinite(newton)
              & (2 * h.abs() <= (dx_old * dh).abs()))
        nxt = torch.where(h == 0, lam, torch.where(ok, newton, 0.5 * (lo + hi)))
        dx_old, lam = nxt - lam, nxt
    _, dh = model(lam)
    return lam, dh


@dataclass
class KrylovSolution(LambdaSolution):
    """A :class:`LambdaSolution` with what only this solver knows."""

    h_raw: Optional[Tensor] = None
    """``|h|`` of the msign at the model's root before the tangent projection: the model's error
    as Newton-Schulz sees it (the applied direction's ``h`` is ~0 by construction)."""
    model_h: Optional[Tensor] = None
    """``h~`` at the returned lambda (~1e-15: the small problem is solved to round-off)."""


def solve_lambda_krylov(M: Tensor, u: Tensor, v: Tensor, msign_fn: MsignFn, lam0: Tensor, *,
                        blocks: int, bound: float, full_shape: Optional[tuple[int, int]] = None,
                        allreduce: Optional[AllReduce] = None,
                        partition_dim: Optional[int] = None,
                        table: Optional[Sequence[tuple[float, float, float]]] = None) -> KrylovSolution:
    """lambda* on the shared Krylov space, then one msign and the tangent projection.

    Args:
        M: ``(B, m, n)`` momenta (shards under tensor parallelism), ``u``/``v`` ``(B, m)``/
            ``(B, n)`` (their local slices on the split dimension).
        msign_fn: the configured msign (with its own tensor-parallel hooks).
        lam0: Newton's start per matrix (last step's root; any value converges).
        blocks: cap on the block steps ``k`` (:func:`krylov_blocks_for`).
        bound: the bracket half-width (:func:`~megatron_sso.ops.lambda_solver.lambda_bound`
            of the full shape).
        full_shape: ``(m, n)`` of the full matrix (default ``M``'s).
        table: the Newton-Schulz steps ``msign_fn`` runs, for the model to mimic
            (:func:`ns_node_weights`); ``None`` models the exact polar factor.
    """
    full_shape = full_shape or (M.size(-2), M.size(-1))
    Y, a, b, split = orient(M, u, v, full_shape, partition_dim)
    k = krylov_blocks_for(min(full_shape), blocks)
    basis = krylov_basis(Y, a, b, k, allreduce, split)
    model = LambdaModel.from_basis(basis, bound, table)
    lam, slope = solve_model(model, lam0, bound)
    model_h, _ = model(lam)
    lam32 = lam.float()
    phi = msign_fn(add_rank1(M, u, v, lam32))
    raw_h = uv_inner(phi, u, v, allreduce).float()
    phi = add_rank1(phi, u, v, -raw_h)  # Theta has unit Frobenius norm
    h = uv_inner(phi, u, v, allreduce).float()
    return KrylovSolution(lam=lam32, h=h, phi=phi, slope=slope.float(), calls=1, fallback=None,
                          h_raw=raw_h.abs(), model_h=model_h.float())
