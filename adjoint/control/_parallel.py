"""How a solver gets C(u) and dC/du: the core's sequential costate recursion, or the
same recursion evaluated in parallel over time.

The costate recursion of a control problem is affine in the costate:

    λ(N) = ∂φ/∂X(N),    λ(k) = A(k)ᵀ λ(k+1) + c(k),   A(k) = ∂f/∂X(k),  c(k) = ∂ℓ/∂X(k)
    dC/du(k) = ∂ℓ/∂u(k) + ∂f/∂u(k)ᵀ λ(k+1)

(λ = −B in the paper's sign). Affine maps compose associatively,
(M₁, v₁) ∘ (M₂, v₂) = (M₁M₂, M₁v₂ + v₁), so all of λ(0..N-1) follow from one
`jax.lax.associative_scan` in O(log N) depth instead of N sequential steps, at the
price of n×n matrix products (O(N n³) work instead of O(N n²)): worth it only for
small state sizes n and long horizons on parallel hardware.
"""

import abc
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from .._parallel_costates import ParallelCostates as ParallelCostates, affine_costates
from ._problem import ControlProblem


class AbstractCostates(eqx.Module):
    """Strategy: how C(u) and dC/du are computed for a `ControlProblem`."""

    @abc.abstractmethod
    def value_and_grad(self, problem: ControlProblem, u: Array) -> tuple[Scalar, Array]:
        """(C(u), dC/du(0..N-1))."""


class SequentialCostates(AbstractCostates):
    """`jax.value_and_grad` of `problem.cost`: the core's costate recursion (the custom
    VJP of `Multistage.trajectory`), N sequential steps backward."""

    def value_and_grad(self, problem, u):
        return jax.value_and_grad(problem.cost)(u)


# `ParallelCostates` (re-exported from the core, an `adjoint.AbstractAdjoint`) also
# serves as a `costates=` strategy here: it provides `value_and_grad(problem, u)`.


def warn_costates(method) -> None:
    """The methods' `costates=` is deprecated: one knob, `ControlProblem(adjoint=...)`."""
    if method.costates is not None:
        warnings.warn(
            f"{type(method).__name__}(costates=...) is deprecated: choose how dC/du is "
            "computed once, with ControlProblem(adjoint=...) (e.g. adjoint.ParallelCostates())",
            DeprecationWarning,
            stacklevel=3,
        )


def parallel_costates(
    problem: ControlProblem, u: Float[Array, "N m"]
) -> tuple[Scalar, Float[Array, "N+1 P n"], Float[Array, "N+1 P n"], Float[Array, "N m"]]:
    """Costates by a parallel-in-time scan.

    The forward pass X(0..N) is the core's (sequential: it is nonlinear). Then
    A(k) = ∂f/∂X, ∂f/∂u, ∂ℓ/∂X, ∂ℓ/∂u are evaluated for all k at once (vmap), and
    λ(k) = A(k)ᵀ λ(k+1) + ∂ℓ/∂X(k) is solved by `jax.lax.associative_scan`.

    **Returns:** `(C, X(0..N), B(0..N), dC/du)`, with B = −λ in the paper's sign and
    the same layout as `ControlProblem.costates`.
    """
    n = problem.state_size
    zs = problem.system(u).trajectory(problem.initial_augmented())
    value = problem._terminal(zs[-1])
    xs = zs[..., :n]
    ks = jnp.arange(problem.horizon, dtype=jnp.int32)

    def linearise(x, uk, k):
        fx, fu = jax.jacfwd(problem.f, argnums=(0, 1))(x, uk, k)
        lx, lu = jax.grad(problem.ell, argnums=(0, 1))(x, uk, k)
        return fx, fu, lx, lu

    per_pattern = jax.vmap(linearise, (0, None, None))
    fx, fu, lx, lu = jax.vmap(per_pattern)(xs[:-1], u, ks)  # (N, P, ...)
    lam_n = jax.vmap(jax.grad(problem.phi))(xs[-1])  # (P, n)
    lam = affine_costates(jnp.swapaxes(fx, -1, -2), lx, lam_n)  # λ(0..N-1)
    lam = jnp.concatenate([lam, lam_n[None]])
    grad = jnp.sum(lu, axis=1) + jnp.einsum("kpim,kpi->km", fu, lam[1:])
    return value, xs, -lam, grad
