"""Shared pieces of the solvers: the method interface, outcome codes, stopping test."""

import abc

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Scalar

from ._problem import ControlProblem


RUNNING = -1
SUCCESS = 0
MAX_STEPS = 1
NONFINITE = 2
STALLED = 3
TARGET = 4
INFEASIBLE = 5

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
}


def default_tol(dtype) -> float:
    return 1e-8 if jnp.finfo(dtype).bits >= 64 else 1e-4


def projected_gradient_norm(problem: ControlProblem, u: Array, g: Array) -> Scalar:
    """‖u − Π(u − ∇C)‖∞: zero exactly at a KKT point of the box-constrained problem."""
    return jnp.max(jnp.abs(u - problem.project(u - g)))


def stop_test(pg: Scalar, cost: Scalar, tol: float) -> Array:
    """The stopping rule shared by every method: ‖u − Π(u − ∇C)‖∞ ≤ tol (1 + |C|)."""
    return pg <= tol * (1 + jnp.abs(cost))


def target_of(method) -> Array:
    """The method's `cost_target` as an array (−inf: none). Pass an array to change it
    without recompiling."""
    target = getattr(method, "cost_target", None)
    return jnp.asarray(-jnp.inf if target is None else target)


def outcome(finite, done, reached, out_of_steps, stalled=False) -> Array:
    """The loop's status after a step, in order of precedence."""
    return jnp.where(
        ~finite,
        NONFINITE,
        jnp.where(
            done,
            SUCCESS,
            jnp.where(
                reached,
                TARGET,
                jnp.where(stalled, STALLED, jnp.where(out_of_steps, MAX_STEPS, RUNNING)),
            ),
        ),
    )


class AbstractMethod(eqx.Module):
    """A strategy for `solve`: runs inside `jit`, returns the final controls, the cost
    history (padded with NaN), the number of iterations and an outcome code."""

    max_steps: eqx.AbstractVar[int]
    tol: eqx.AbstractVar[float | None]
    cost_target: eqx.AbstractVar[float | Array | None]

    @abc.abstractmethod
    def run(
        self, problem: ControlProblem, u0: Float[Array, "N m"], tol: float
    ) -> tuple[Float[Array, "N m"], Float[Array, " S"], Int[Array, ""], Int[Array, ""]]:
        """Iterate from the feasible `u0` until `stop_test` holds or the budget ends."""
