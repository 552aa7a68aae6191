"""Shared pieces of the solvers: the method interface, outcome codes, stopping test."""

import abc

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Scalar

from .._results import RESULTS
from ._problem import ControlProblem


# Internal loop codes: the indices of `adjoint.RESULTS` (checked in `as_results`), -1 while
# the loop runs. Records carry the `RESULTS` item, never the int.
RUNNING = -1
SUCCESS = 0
MAX_STEPS = 1
NONFINITE = 2
STALLED = 3
TARGET = 4
INFEASIBLE = 5
UNBOUNDED = 6

MESSAGES = {
    SUCCESS: (
        "the projected gradient (with constraints: the KKT residual) fell below the tolerance"
    ),
    MAX_STEPS: "the maximum number of steps was reached before the tolerance",
    NONFINITE: "the cost or its gradient became non-finite (NaN or inf in the rollout)",
    STALLED: "the line search / regularisation could not decrease the cost further",
    TARGET: "the cost reached cost_target",
    INFEASIBLE: (
        "the constraints could not be satisfied: the violation stopped falling at the "
        "maximum penalty (the problem may be infeasible)"
    ),
    UNBOUNDED: (
        "the cost fell without bound (by more than (1 + |C(u_init)|)/sqrt(eps) below its "
        "start): the problem may be unbounded below; add bounds or a control cost"
    ),
}


_RESULT_NAMES = {
    MAX_STEPS: "max_steps_reached",
    NONFINITE: "nonfinite",
    STALLED: "stalled",
    TARGET: "target_reached",
    INFEASIBLE: "infeasible",
    UNBOUNDED: "unbounded",
}


def as_results(code: Int[Array, ""]) -> RESULTS:
    """The loop's int outcome code as an `adjoint.RESULTS` item (works under jit/vmap)."""
    item = RESULTS.successful
    for value, name in _RESULT_NAMES.items():
        item = RESULTS.where(code == value, getattr(RESULTS, name), item)
    return item


def default_tol(dtype) -> float:
    """The relative tolerance: 1e-8 in float64, 1e-4 in float32 (and lower precisions)."""
    return 1e-8 if jnp.finfo(dtype).bits >= 64 else 1e-4


def gradient_floor(dtype) -> float:
    """The absolute floor of the gradient tolerance, eps^(3/4): 1.8e-12 in float64,
    6.6e-6 in float32 (a start already at the optimum needs some absolute scale)."""
    return float(jnp.finfo(dtype).eps) ** 0.75


def gradient_tolerance(tol: float | Scalar, pg0: Scalar, dtype) -> Scalar:
    """The stopping tolerance on the projected gradient, max(tol · ‖PG(u_init)‖∞, floor):
    relative to the projected gradient at the start, so that adding a constant to the
    cost changes nothing and scaling the cost scales both sides alike."""
    return jnp.maximum(tol * pg0, gradient_floor(dtype))


def projected_gradient_norm(problem: ControlProblem, u: Array, g: Array) -> Scalar:
    """‖u − Π(u − ∇C)‖∞: zero exactly at a KKT point of the box-constrained problem."""
    return jnp.max(jnp.abs(u - problem.project(u - g)))


def stop_test(pg: Scalar, gtol: Scalar | float) -> Array:
    """The stopping rule shared by every method: ‖u − Π(u − ∇C)‖∞ ≤ gtol, with gtol from
    `gradient_tolerance` (invariant to adding a constant to C)."""
    return pg <= gtol


def unbounded(cost: Scalar, cost0: Scalar) -> Array:
    """The cost fell by more than (1 + |C(u_init)|)/sqrt(eps) below its start: 6.7e7 times
    its scale in float64, 2.9e3 in float32 (a sign of a problem unbounded below)."""
    eps = jnp.finfo(jnp.result_type(cost)).eps
    return cost < cost0 - (1 + jnp.abs(cost0)) / jnp.sqrt(eps)


def target_of(method) -> Array:
    """The method's `cost_target` as an array (−inf: none). Pass an array to change it
    without recompiling."""
    target = getattr(method, "cost_target", None)
    return jnp.asarray(-jnp.inf if target is None else target)


def outcome(finite, done, reached, out_of_steps, stalled=False, diverged=False) -> Array:
    """The loop's status after a step, in order of precedence."""
    return jnp.where(
        ~finite,
        NONFINITE,
        jnp.where(
            done,
            SUCCESS,
            jnp.where(
                diverged,
                UNBOUNDED,
                jnp.where(
                    reached,
                    TARGET,
                    jnp.where(stalled, STALLED, jnp.where(out_of_steps, MAX_STEPS, RUNNING)),
                ),
            ),
        ),
    )


class AbstractMethod(eqx.Module):
    """A strategy for `solve`: runs inside `jit`, returns the final controls, the cost
    history (padded with NaN), the number of iterations and an outcome code. `gtol` is
    the absolute tolerance on the projected gradient (`gradient_tolerance`)."""

    max_steps: eqx.AbstractVar[int]
    tol: eqx.AbstractVar[float | None]
    cost_target: eqx.AbstractVar[float | Array | None]

    @abc.abstractmethod
    def run(
        self, problem: ControlProblem, u0: Float[Array, "N m"], gtol: Scalar
    ) -> tuple[Float[Array, "N m"], Float[Array, " S"], Int[Array, ""], Int[Array, ""]]:
        """Iterate from the feasible `u0` until `stop_test(pg, gtol)` holds or the budget
        ends."""
