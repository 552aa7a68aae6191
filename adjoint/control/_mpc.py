"""Model predictive control: `solve` in a receding horizon, differentiable end to end.

At closed-loop step t the controller solves the problem from the current state X(t)
over its N stages, applies the first control u*(0), and the plant moves on:

    u*(·; t) = argmin_u C(u; X(t), θ),   X(t+1) = plant(X(t), u*(0; t), t),

the next solve starting from the shifted plan (u*(1..N-1; t), u*(N-1; t)). The whole
rollout is one `jax.lax.scan`, so it runs inside `jit`; every solve carries the implicit
derivative of `solve` (the LQ problem at its KKT point), so `jax.grad` of a loss on the
closed-loop trajectory reaches the cost weights, the model's parameters, the bounds and
X(0) through T implicit derivatives and the plant, never through solver iterations.
"""

import warnings
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._base import AbstractMethod
from ._problem import ControlProblem
from ._solve import solve


class MPCTrajectory(eqx.Module):
    """The closed loop of `MPC`.

    - `states`: X(0..T), (T+1, n); `controls`: the applied u*(0; t), (T, m).
    - `plan_costs`: each solve's optimal cost C*(t), (T,).
    - `converged`: whether each solve converged (and its derivative holds), (T,).
    - `num_steps`: each solve's iterations, (T,) (warm starts make them few).
    """

    states: Float[Array, "T_plus_1 n"]
    controls: Float[Array, "T m"]
    plan_costs: Float[Array, " T"]
    converged: Bool[Array, " T"]
    num_steps: Int[Array, " T"]

    @property
    def iterations(self) -> Int[Array, " T"]:
        """Deprecated name of `num_steps` (removed in the next release)."""
        warnings.warn(
            "MPCTrajectory.iterations is deprecated: use num_steps", DeprecationWarning, 2
        )
        return self.num_steps


class MPC(eqx.Module):
    """Receding-horizon control with warm-started (shifted) plans.

    **Arguments:**

    - `steps`: T, the number of closed-loop steps.
    - `method`: the solver of each step (default `ILQR()`).
    - `throw`: raise if a solve does not converge (as `solve`); False records it in
      `MPCTrajectory.converged`.
    - `pontryagin`: whether `converged` also asks for the minimum-principle check
      (default False: the implicit derivative needs the KKT conditions only).

    Call it as `mpc(problem, x0=None, u_init=None, plant=None)`: `problem` is the
    model (one initial state; its stage index k counts from 0 in every window), `x0` the
    plant's initial state (default the problem's), `u_init` the first plan (default
    zeros projected on the box), `plant(x, u, t)` the true system (default the model's
    own dynamics at k = 0). Returns an `MPCTrajectory`.
    """

    steps: int = eqx.field(static=True)
    method: AbstractMethod | None = None
    throw: bool = eqx.field(static=True, default=True)
    pontryagin: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"MPC: steps must be a positive int, got {self.steps!r}")

    def __call__(
        self,
        problem: ControlProblem,
        x0: Float[Array, " n"] | None = None,
        u_init: Float[Array, "N m"] | None = None,
        plant: Callable | None = None,
    ) -> MPCTrajectory:
        if not isinstance(problem, ControlProblem):
            raise TypeError(f"MPC: problem must be a ControlProblem, got {type(problem).__name__}")
        if problem.batched:
            raise ValueError(
                f"MPC: the problem must have one initial state, got a batch of "
                f"{problem.n_initial_states}; vmap the MPC over initial states instead"
            )
        if u_init is None:
            if problem.control_size is None:
                raise ValueError("MPC: the control size is unknown; pass u_init or control_size=")
            u_init = jnp.zeros((problem.horizon, problem.control_size), problem.dtype)
        elif problem.control_size is None:
            problem = problem.with_control_size(int(jnp.shape(u_init)[-1]))
        u_init = problem.project(problem.check_controls(u_init))
        x0 = problem.x0[0] if x0 is None else jnp.asarray(x0, problem.dtype)
        if x0.shape != (problem.state_size,):
            raise ValueError(
                f"MPC: x0 must have shape (n,) = ({problem.state_size},); got {x0.shape}"
            )
        if plant is None:
            plant = lambda x, u, t: problem.f(x, u, jnp.zeros((), jnp.int32))

        def step(carry, t):
            x, plan = carry
            here = eqx.tree_at(lambda p: p.x0, problem, x[None])
            sol = solve(here, plan, self.method, pontryagin=self.pontryagin, throw=self.throw)
            u = sol.controls[0]
            x_next = jnp.asarray(plant(x, u, t), problem.dtype)
            shifted = jnp.concatenate([sol.controls[1:], sol.controls[-1:]])
            carry = (x_next, problem.project(jax.lax.stop_gradient(shifted)))
            return carry, (x_next, u, sol.cost, sol.derivative_ok, sol.num_steps)

        ts = jnp.arange(self.steps, dtype=jnp.int32)
        _, (xs, us, costs, ok, its) = jax.lax.scan(step, (x0, u_init), ts)
        states = jnp.concatenate([x0[None], xs])
        return MPCTrajectory(states, us, costs, ok, its)
