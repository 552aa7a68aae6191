"""Continuous-time costates: Hamilton's equations for dX/dt = f(t, X, W), with diffrax.

For dynamics dX/dt = f(t, X, W) on [t0, t1], X(t0) = x0, and the performance index

    C = Φ(X(t1)) + ∫_{t0}^{t1} ℓ(t, X, W) dt,

the Lagrangian C + ∫ Bᵀ (dX/dt − f) dt = Φ + ∫ (Bᵀ dX/dt − H) dt, with the paper's
multiplier B = −∂C/∂X and the paper's Hamiltonian (footnote 5; the sign of
`adjoint.hamiltonian` for stages)

    H(t, X, B, W) = Bᵀ f(t, X, W) − ℓ(t, X, W),

is stationary along Hamilton's equations

    dX/dt =  ∂H/∂B = f,                       X(t0) = x0             (state, forward)
    dB/dt = −∂H/∂X = −∂fᵀ/∂X B + ∂ℓᵀ/∂X,    B(t1) = −∂Φᵀ/∂X(t1)   (costate, backward)

and the gradients are

    dC/dW = −∫_{t0}^{t1} ∂H/∂W dt = ∫ (∂ℓ/∂W − ∂fᵀ/∂W B) dt,    dC/dx0 = −B(t0).

Two modes compute these gradients, both in memory independent of the number of steps:

- `mode="reversible"` (the default), discretise-then-optimise: the state is integrated
  by the algebraically reversible version `Reversible(solver)` of the solver (McCallum &
  Foster, 2024), and the costate is the discrete costate recursion of that scheme, run
  backward by `ReversibleAdjoint` while each step is reconstructed exactly from the next
  (see `adjoint._reversible`). The gradient is the exact gradient of the computed C,
  equal to `jax.grad` through the same solve with `diffrax.RecursiveCheckpointAdjoint`
  up to round-off.
- `mode="optimise-then-discretise"`: the costate ODE above is integrated backward with a
  diffrax solver, carrying (X, B, G) with dG/dt = ∂H/∂W, G(t1) = 0, so G(t0) = dC/dW. X
  is re-integrated backward from X(t1) alongside B, which is accurate when the dynamics
  are not strongly dissipative; the gradient approximates the exact one to the solver's
  tolerance (as `diffrax.BacksolveAdjoint`).

`compare_costate_gradients` reports how far the result is from discretise-then-optimise
(`diffrax.RecursiveCheckpointAdjoint` on the same solver) and from
`diffrax.BacksolveAdjoint`.
"""

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Int, PyTree, Scalar

from ._reversible import Reversible, ReversibleAdjoint


_MODES = ("reversible", "optimise-then-discretise")


def _zero_cost(*args):
    return jnp.zeros(())


class CostateODESolution(eqx.Module):
    """One evaluation of C and its gradient by the backward costate recursion.

    - `value`: C = Φ(X(t1)) + ∫ ℓ dt.
    - `grads`: dC/dW, shaped like the inexact arrays of `params`.
    - `final_state`: X(t1).
    - `initial_costate`: B(t0) = −dC/dx0 (paper's sign).
    - `final_costate`: B(t1) = −∂Φ/∂X(t1).
    - `forward_steps`, `backward_steps`: steps taken forward and backward (equal in the
      reversible mode, whose backward pass replays the forward steps).
    """

    value: Scalar
    grads: PyTree
    final_state: Array
    initial_costate: Array
    final_costate: Array
    forward_steps: Int[Array, ""]
    backward_steps: Int[Array, ""]


class _Problem(eqx.Module):
    vector_field: Callable
    running_cost: Callable
    terminal_cost: Callable
    solver: diffrax.AbstractSolver
    backward_solver: diffrax.AbstractSolver
    stepsize_controller: diffrax.AbstractStepSizeController
    t0: float
    t1: float
    dt0: float | None
    max_steps: int
    throw: bool = eqx.field(static=True)
    mode: str = eqx.field(static=True, default="reversible")

    def hamiltonian(self, t, x, b, params):
        """The paper's H(t, X, B, W) = Bᵀ f(t, X, W) − ℓ(t, X, W)."""
        return jnp.vdot(b, self.vector_field(t, x, params)) - self.running_cost(t, x, params)

    def forward_term(self):
        # (X, c) with dc/dt = ℓ: the running cost integrated by the same solver.
        def vf(t, y, params):
            x, _ = y
            return self.vector_field(t, x, params), self.running_cost(t, x, params)

        return diffrax.ODETerm(vf)

    def forward(self, params, x0, adjoint=diffrax.RecursiveCheckpointAdjoint()):
        y0 = (x0, jnp.zeros((), x0.dtype))
        sol = diffrax.diffeqsolve(
            self.forward_term(),
            self.solver,
            self.t0,
            self.t1,
            self.dt0,
            y0,
            args=params,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=self.stepsize_controller,
            adjoint=adjoint,
            max_steps=self.max_steps,
            throw=self.throw,
        )
        x1, c1 = sol.ys[0][-1], sol.ys[1][-1]
        return x1, c1 + self.terminal_cost(x1), sol.stats["num_steps"]

    def backward(self, params, x1, b1):
        """Integrate Hamilton's equations from t1 back to t0, carrying (X, B, G) with

            dX/dt = ∂H/∂B,   dB/dt = −∂H/∂X,   dG/dt = ∂H/∂W,   G(t1) = 0,

        so that G(t0) = −∫ ∂H/∂W dt = dC/dW; returns X(t0), B(t0), dC/dW."""
        diff, static = eqx.partition(params, eqx.is_inexact_array)

        def vf(t, y, args):
            x, b, _ = y
            d = args

            def h(x, b, d):
                return self.hamiltonian(t, x, b, eqx.combine(d, static))

            dh_dx, dh_db, dh_dw = jax.grad(h, argnums=(0, 1, 2))(x, b, d)
            return dh_db, -dh_dx, dh_dw  # dX/dt = ∂H/∂B, dB/dt = −∂H/∂X, dG/dt = ∂H/∂W

        g1 = jtu.tree_map(jnp.zeros_like, diff)
        dt0 = None if self.dt0 is None else -self.dt0
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vf),
            self.backward_solver,
            self.t1,
            self.t0,
            dt0,
            (x1, b1, g1),
            args=diff,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=self.stepsize_controller,
            max_steps=self.max_steps,
            throw=self.throw,
        )
        x0, b0, grads = jtu.tree_map(lambda y: y[-1], sol.ys)
        return x0, b0, grads, sol.stats["num_steps"]


def _problem(
    vector_field,
    *,
    t0,
    t1,
    dt0,
    running_cost,
    terminal_cost,
    solver,
    stepsize_controller,
    max_steps,
    throw,
    backward_solver=None,
    mode="reversible",
) -> _Problem:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if not callable(vector_field):
        raise TypeError("vector_field must be a callable f(t, X, W)")
    if running_cost is None and terminal_cost is None:
        raise ValueError("give a running_cost ℓ(t, X, W), a terminal_cost Φ(X), or both")
    for name, fn in (("running_cost", running_cost), ("terminal_cost", terminal_cost)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    if stepsize_controller is None:
        stepsize_controller = diffrax.ConstantStepSize()
    if isinstance(stepsize_controller, diffrax.ConstantStepSize) and dt0 is None:
        raise ValueError("dt0 is required with a constant step size")
    if mode == "reversible":
        if backward_solver is not None:
            raise ValueError(
                "backward_solver applies to mode='optimise-then-discretise' only: the "
                "reversible mode's backward pass is the discrete costate recursion of "
                "the forward scheme"
            )
        if not isinstance(solver, Reversible):
            solver = Reversible(solver)
    return _Problem(
        vector_field,
        _zero_cost if running_cost is None else running_cost,
        (lambda x: jnp.zeros((), x.dtype)) if terminal_cost is None else terminal_cost,
        solver,
        solver if backward_solver is None else backward_solver,
        stepsize_controller,
        t0,
        t1,
        dt0,
        max_steps,
        throw,
        mode,
    )


def _check_costs(problem: _Problem, params, x0) -> None:
    for name, out in (
        ("terminal_cost", eqx.filter_eval_shape(problem.terminal_cost, x0)),
        ("running_cost", eqx.filter_eval_shape(problem.running_cost, problem.t0, x0, params)),
        ("vector_field", eqx.filter_eval_shape(problem.vector_field, problem.t0, x0, params)),
    ):
        expected = x0.shape if name == "vector_field" else ()
        if getattr(out, "shape", None) != expected:
            raise ValueError(
                f"{name} must return shape {expected}, got {getattr(out, 'shape', out)}"
            )


def costate_ode(
    vector_field: Callable,
    params: PyTree,
    x0: Array,
    *,
    t0: float,
    t1: float,
    dt0: float | None = None,
    running_cost: Callable | None = None,
    terminal_cost: Callable | None = None,
    solver: diffrax.AbstractSolver = diffrax.Tsit5(),
    backward_solver: diffrax.AbstractSolver | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    max_steps: int = 16384,
    throw: bool = True,
    mode: str = "reversible",
) -> CostateODESolution:
    """C and dC/dW for dX/dt = f(t, X, W) by a backward costate pass in memory
    independent of the number of steps (see the module docstring), with diffrax.

    By default (`mode="reversible"`) X is integrated by `Reversible(solver)` and the
    gradient is the exact gradient of the computed C (the discrete costate recursion of
    the scheme, `ReversibleAdjoint`); `mode="optimise-then-discretise"` integrates the
    costate ODE dB/dt = −∂H/∂X backward instead (an approximation of that gradient).

    Cost: each reversible step is two base steps (from z_n forward, from y_{n+1}
    backward), and its backward pass runs both again with their VJPs. Measured at n =
    128, batch 64, float32, 1,000 steps (`benchmarks/results/continuous_costates.md`),
    in units of the plain Tsit5 forward: the default Tsit5 base 6.2×, as
    `diffrax.RecursiveCheckpointAdjoint` (6.2×, whose memory grows with the number of
    steps) and a little slower than `mode="optimise-then-discretise"` (5.4×, inexact);
    a Midpoint base (`solver=diffrax.Midpoint()`) 1.9×. Choose the reversible mode for
    an exact gradient in O(1) memory (the costate ODE's gradient is off by its
    integration error, and goes wrong for dissipative dynamics, whose backward state
    reconstruction is unstable); choose the Midpoint base when the discretisation error
    of a second-order scheme is acceptable (compare with a fine reference: on that
    problem it is below float32's round-off from 1,000 steps on). Tsit5 stays the
    default base as it is accurate per step and adaptive. The reconstruction is
    re-anchored on 16 stored states spread over the solve (see `ReversibleAdjoint`),
    so its float32 round-off stays at that of `diffrax.RecursiveCheckpointAdjoint`
    over 10,000 steps; a reconstruction that drifts anyway (stiff dynamics) raises
    instead of returning its gradient.

    **Arguments:**

    - `vector_field`: f(t, X, W) returning dX/dt (X may carry a pattern axis).
    - `params`: W, any pytree; its inexact arrays are differentiated.
    - `x0`: X(t0).
    - `t0`, `t1`, `dt0`: the interval and the (initial) step.
    - `running_cost`: ℓ(t, X, W) → scalar (summed over patterns), or None.
    - `terminal_cost`: Φ(X(t1)) → scalar, or None.
    - `solver`: a diffrax solver (default `Tsit5()`). In the reversible mode it is the
      base of the reversible scheme (wrapped in `Reversible` unless it already is one);
      otherwise it is used forward and backward.
    - `backward_solver`: (`mode="optimise-then-discretise"` only) another solver for the
      costate ODE (default: `solver`): a lower-order solver (e.g. `diffrax.Bosh3()`)
      trades O(dt^p) gradient error for fewer vector-field evaluations;
      `compare_costate_gradients` shows the difference.
    - `stepsize_controller`: default `diffrax.ConstantStepSize()` (then `dt0` is needed).
    - `max_steps`, `throw`: as in `diffrax.diffeqsolve`.
    - `mode`: `"reversible"` (default) or `"optimise-then-discretise"`.
    """
    problem = _problem(
        vector_field,
        t0=t0,
        t1=t1,
        dt0=dt0,
        running_cost=running_cost,
        terminal_cost=terminal_cost,
        solver=solver,
        stepsize_controller=stepsize_controller,
        max_steps=max_steps,
        throw=throw,
        backward_solver=backward_solver,
        mode=mode,
    )
    x0 = jnp.asarray(x0)
    _check_costs(problem, params, x0)
    return _costate_ode(problem, params, x0)


@eqx.filter_jit
def _costate_ode(problem: _Problem, params, x0) -> CostateODESolution:
    if problem.mode == "reversible":

        def cost(params_x0):
            x1, value, steps = problem.forward(*params_x0, ReversibleAdjoint())
            return value, (x1, steps)

        (value, (x1, steps)), (grads, x0_grad) = eqx.filter_value_and_grad(cost, has_aux=True)(
            (params, x0)
        )
        b1 = -jax.grad(problem.terminal_cost)(x1)  # B(t1) = −∂Φ/∂X(t1)
        return CostateODESolution(value, grads, x1, -x0_grad, b1, steps, steps)
    x1, value, fsteps = problem.forward(params, x0)
    b1 = -jax.grad(problem.terminal_cost)(x1)  # B(t1) = −∂Φ/∂X(t1)
    _, b0, grads, bsteps = problem.backward(params, x1, b1)
    return CostateODESolution(value, grads, x1, b0, b1, fsteps, bsteps)


def trajectory_cost(
    vector_field: Callable,
    params: PyTree,
    x0: Array,
    *,
    t0: float,
    t1: float,
    dt0: float | None = None,
    running_cost: Callable | None = None,
    terminal_cost: Callable | None = None,
    solver: diffrax.AbstractSolver = diffrax.Tsit5(),
    backward_solver: diffrax.AbstractSolver | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    max_steps: int = 16384,
    mode: str = "reversible",
) -> Scalar:
    """C = Φ(X(t1)) + ∫ ℓ dt as a differentiable function of `params` and `x0`, whose
    VJP is the backward costate pass of `mode`: `jax.grad` returns dC/dW and −B(t0) =
    dC/dx0. By default (`"reversible"`) the solve is `Reversible(solver)` and its
    gradient is exact, by `ReversibleAdjoint`; with `"optimise-then-discretise"` it is
    the backward costate ODE, integrated by `diffrax.BacksolveAdjoint` (the same
    equations as `costate_ode`'s backward pass, on diffrax's adjoint interface).
    Either way the forward pass stores X(t1) (and one time per step) only. Arguments as
    in `costate_ode`."""
    problem = _problem(
        vector_field,
        t0=t0,
        t1=t1,
        dt0=dt0,
        running_cost=running_cost,
        terminal_cost=terminal_cost,
        solver=solver,
        stepsize_controller=stepsize_controller,
        max_steps=max_steps,
        throw=True,
        backward_solver=backward_solver,
        mode=mode,
    )
    x0 = jnp.asarray(x0)
    _check_costs(problem, params, x0)
    if mode == "reversible":
        adjoint = ReversibleAdjoint()
    else:  # diffrax's own backward costate ODE, on the solver of `backward_solver`
        adjoint = diffrax.BacksolveAdjoint(solver=problem.backward_solver)
    return problem.forward(params, x0, adjoint)[1]


class CostateComparison(eqx.Module):
    """Optimise-then-discretise (our costate ODE) against discretise-then-optimise.

    - `costate_ode`: dC/dW from `costate_ode` (in its `mode`).
    - `recursive_checkpoint`: dC/dW from `jax.grad` through the discretised solve with
      `diffrax.RecursiveCheckpointAdjoint` on the same solver (`Reversible(solver)` in
      the reversible mode): discretise-then-optimise, the exact gradient of the
      computed C.
    - `backsolve`: dC/dW with `diffrax.BacksolveAdjoint`.
    - `rel_diff_recursive_checkpoint`, `rel_diff_backsolve`: max |ours − theirs| /
      max |theirs| over all leaves.
    - `value`: C.
    """

    value: Scalar
    costate_ode: PyTree
    recursive_checkpoint: PyTree
    backsolve: PyTree
    rel_diff_recursive_checkpoint: Scalar
    rel_diff_backsolve: Scalar


def _rel_diff(a, b) -> Scalar:
    la, lb = jtu.tree_leaves(a), jtu.tree_leaves(b)
    diff = jnp.max(jnp.stack([jnp.max(jnp.abs(x - y)) for x, y in zip(la, lb)]))
    scale = jnp.max(jnp.stack([jnp.max(jnp.abs(y)) for y in lb]))
    return diff / jnp.maximum(scale, jnp.finfo(scale.dtype).tiny)


def diffrax_gradient(
    vector_field: Callable,
    params: PyTree,
    x0: Array,
    *,
    adjoint: diffrax.AbstractAdjoint,
    t0: float,
    t1: float,
    dt0: float | None = None,
    running_cost: Callable | None = None,
    terminal_cost: Callable | None = None,
    solver: diffrax.AbstractSolver = diffrax.Tsit5(),
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    max_steps: int = 16384,
) -> PyTree:
    """dC/dW by `jax.grad` through `diffrax.diffeqsolve(..., adjoint=adjoint)` on the same
    problem as `costate_ode` (the references it is checked against)."""
    problem = _problem(
        vector_field,
        t0=t0,
        t1=t1,
        dt0=dt0,
        running_cost=running_cost,
        terminal_cost=terminal_cost,
        solver=solver,
        stepsize_controller=stepsize_controller,
        max_steps=max_steps,
        throw=True,
    )
    x0 = jnp.asarray(x0)
    return _diffrax_gradient(problem, params, x0, adjoint)


@eqx.filter_jit
def _diffrax_gradient(problem, params, x0, adjoint):
    return eqx.filter_grad(lambda p: problem.forward(p, x0, adjoint)[1])(params)


def compare_costate_gradients(vector_field: Callable, params: PyTree, x0: Array, **kwargs):
    """Run `costate_ode` and `diffrax_gradient` with `RecursiveCheckpointAdjoint` and
    `BacksolveAdjoint` on one problem and report how far the gradients are apart.
    Keyword arguments as in `costate_ode`. Returns a `CostateComparison`."""
    ours = costate_ode(vector_field, params, x0, **kwargs)
    kwargs.pop("throw", None)
    kwargs.pop("backward_solver", None)
    if kwargs.pop("mode", "reversible") == "reversible":
        solver = kwargs.get("solver", diffrax.Tsit5())
        kwargs["solver"] = solver if isinstance(solver, Reversible) else Reversible(solver)
    rc = diffrax_gradient(
        vector_field, params, x0, adjoint=diffrax.RecursiveCheckpointAdjoint(), **kwargs
    )
    bs = diffrax_gradient(vector_field, params, x0, adjoint=diffrax.BacksolveAdjoint(), **kwargs)
    return CostateComparison(
        ours.value, ours.grads, rc, bs, _rel_diff(ours.grads, rc), _rel_diff(ours.grads, bs)
    )
