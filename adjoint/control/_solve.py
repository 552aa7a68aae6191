"""`solve`: first-order methods built on the costate gradient, and the solution record.

Every method reads dC/du(k) from the costate recursion (the core's, or its parallel
form) and stops when the projected gradient ‖u − Π(u − ∇C)‖∞ ≤ max(tol · its value at
u_init, eps^(3/4)): a rule that adding a constant to C or scaling C does not change. The
loops are `jax.lax.while_loop`s inside one `jit`; `converged` is decided again, by the
independent KKT check of the returned controls.
"""

import functools
import warnings
from typing import no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int, Scalar

from .._results import RESULTS
from . import _constraints
from ._base import (
    INFEASIBLE,
    MAX_STEPS,
    MESSAGES,
    NONFINITE,
    RUNNING,
    STALLED,
    SUCCESS,
    TARGET,
    UNBOUNDED,
    AbstractMethod,
    as_results,
    default_tol,
    gradient_tolerance,
    outcome,
    projected_gradient_norm,
    stop_test,
    target_of,
    unbounded,
)
from ._constraints import AugmentedLagrangian, Multipliers
from ._implicit import attach, linearise
from ._kkt import ControlKKT, analyse, analyse_constrained
from ._parallel import AbstractCostates, ParallelCostates, warn_costates
from ._problem import ControlProblem


def _constant(tree):
    """`tree` with every array cut off from differentiation (`lax.stop_gradient`)."""
    return jax.tree_util.tree_map(
        lambda x: jax.lax.stop_gradient(x) if eqx.is_array(x) else x, tree
    )


def _finite(*xs) -> Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))


def _value_and_grad(costates, problem: ControlProblem, u: Array):
    """(C(u), dC/du) by the problem's own adjoint (or a deprecated `costates=`)."""
    if costates is None:
        return jax.value_and_grad(problem.cost)(u)
    return costates.value_and_grad(problem, u)


def _initial_status(problem, u, c, g, gtol, max_steps, target):
    pg = projected_gradient_norm(problem, u, g)
    return outcome(_finite(c, g), stop_test(pg, gtol), c <= target, max_steps <= 0)


class GradientDescent(AbstractMethod):
    """The paper's update u(k) ← u(k) − η dC/du(k) (eq. 9, descent on C), with any optax
    optimiser in place of the fixed step, projected on the box after each step:

        u ← Π_[lower, upper](u + optax_update(dC/du)).

    **Arguments:** `optimizer` (default `optax.sgd(1e-2)`), `max_steps`, `tol` (relative
    to the projected gradient at u_init, see `ILQR`; None: 1e-8 in float64, 1e-4 in
    float32), `cost_target` (stop once C ≤ it; an array changes it without
    recompiling). How dC/du is computed is the problem's one choice,
    `ControlProblem(adjoint=...)` (the recursion, `AutodiffAdjoint()` or
    `ParallelCostates()`); `costates=` is deprecated.
    """

    optimizer: optax.GradientTransformation = optax.sgd(1e-2)
    max_steps: int = 10_000
    tol: float | None = None
    costates: AbstractCostates | ParallelCostates | None = None
    cost_target: float | Array | None = None

    def __check_init__(self):
        warn_costates(self)

    def run(self, problem, u0, gtol):
        vg = functools.partial(_value_and_grad, self.costates, problem)
        c0, g0 = vg(u0)
        history = jnp.full(self.max_steps + 1, jnp.nan, u0.dtype).at[0].set(c0)
        target = target_of(self)
        status = _initial_status(problem, u0, c0, g0, gtol, self.max_steps, target)
        carry = (jnp.array(0), u0, c0, g0, self.optimizer.init(u0), history, status)

        def body(carry):
            i, u, c, g, opt_state, history, _ = carry
            updates, new_state = self.optimizer.update(g, opt_state, u)
            u_new = problem.project(optax.apply_updates(u, updates))
            c_new, g_new = vg(u_new)
            finite = _finite(c_new, g_new)
            i = i + 1
            done = stop_test(projected_gradient_norm(problem, u_new, g_new), gtol)
            diverged = unbounded(c_new, c0)
            status = outcome(finite, done, c_new <= target, i >= self.max_steps, False, diverged)
            keep = lambda new, old: jnp.where(finite, new, old)
            new_state = jax.tree_util.tree_map(keep, new_state, opt_state)
            history = history.at[i].set(jnp.where(finite, c_new, c))
            return (i, keep(u_new, u), keep(c_new, c), keep(g_new, g), new_state, history, status)

        i, u, c, _, _, history, status = jax.lax.while_loop(
            lambda carry: carry[-1] == RUNNING, body, carry
        )
        return u, history, i, status


class ProjectedGradient(AbstractMethod):
    """Spectral projected gradient for the box (Birgin–Martínez–Raydan):

        u⁺ = Π(u − α dC/du),  α from Barzilai–Borwein (sᵀs / sᵀy),
        halved until C(u⁺) ≤ C(u) + 10⁻⁴ ∇Cᵀ(u⁺ − u)  (Armijo along the projection arc).

    **Arguments:** `max_steps`, `tol`, `max_backtracks`, `cost_target` (as
    `GradientDescent`).
    """

    max_steps: int = 5_000
    tol: float | None = None
    max_backtracks: int = 40
    costates: AbstractCostates | ParallelCostates | None = None
    cost_target: float | Array | None = None

    def __check_init__(self):
        warn_costates(self)

    def run(self, problem, u0, gtol):
        vg = functools.partial(_value_and_grad, self.costates, problem)
        c0, g0 = vg(u0)
        history = jnp.full(self.max_steps + 1, jnp.nan, u0.dtype).at[0].set(c0)
        target = target_of(self)
        status = _initial_status(problem, u0, c0, g0, gtol, self.max_steps, target)
        g_max = jnp.max(jnp.abs(g0))  # a first step of length ≤ 1, whatever C's scale
        alpha0 = jnp.where(g_max > 0, 1 / jnp.where(g_max > 0, g_max, 1), 1.0)
        carry = (jnp.array(0), u0, c0, g0, alpha0, history, status)

        def body(carry):
            i, u, c, g, alpha, history, _ = carry

            def trial(a):
                u_t = problem.project(u - a * g)
                c_t = problem.cost(u_t)
                # Armijo, up to the rounding of C: a decrease below it is invisible (a
                # large constant in C), and the gradient test decides convergence anyway
                rounding = 16 * jnp.finfo(c.dtype).eps * jnp.abs(c)
                ok = jnp.isfinite(c_t) & (c_t <= c + 1e-4 * jnp.vdot(g, u_t - u) + rounding)
                return u_t, ok

            def ls_body(state):
                j, a, _, _ = state
                a = a / 2
                u_t, ok = trial(a)
                return j + 1, a, u_t, ok

            u_t, ok = trial(alpha)
            j, a, u_t, ok = jax.lax.while_loop(
                lambda s: ~s[3] & (s[0] < self.max_backtracks), ls_body, (0, alpha, u_t, ok)
            )
            c_new, g_new = vg(u_t)
            ok = ok & _finite(c_new, g_new)
            s, y = u_t - u, g_new - g
            sty = jnp.vdot(s, y)
            alpha_next = jnp.where(sty > 0, jnp.vdot(s, s) / jnp.where(sty > 0, sty, 1), 2 * a)
            alpha_next = jnp.clip(alpha_next, 1e-12, 1e12)
            i = i + 1
            done = stop_test(projected_gradient_norm(problem, u_t, g_new), gtol)
            status = outcome(
                _finite(c_new, g_new),
                done & ok,
                ok & (c_new <= target),
                i >= self.max_steps,
                ~ok,
                unbounded(c_new, c0),
            )
            keep = lambda new, old: jnp.where(ok, new, old)
            history = history.at[i].set(keep(c_new, c))
            return (i, keep(u_t, u), keep(c_new, c), keep(g_new, g), alpha_next, history, status)

        i, u, c, _, _, history, status = jax.lax.while_loop(
            lambda carry: carry[-1] == RUNNING, body, carry
        )
        return u, history, i, status


class Solution(eqx.Module):
    """What `solve` returns.

    - `controls`: u(0..N-1), (N, m).
    - `states`: X(0..N), (N+1, n), or (N+1, P, n) for a batch of initial states.
    - `costates`: B(0..N) = −∂C/∂X(k) in the paper's sign, shaped like `states`.
    - `cost`: C at `controls`; `cost_history`: C after each iteration (entry 0 = C(u_init)),
      padded with NaN after `num_steps` (fixed length, so `solve` works under `jit`).
    - `kkt`: a `ControlKKT` (stationarity, bound multipliers, complementarity,
      feasibility, Lagrangian residuals, Hamiltonian, Pontryagin gap).
    - `num_steps`: the method's iterations; `result`: an `adjoint.RESULTS` item
      (`successful`, `max_steps_reached`, `nonfinite`, `stalled`, `target_reached`,
      `infeasible`, `unbounded`; see `message`); `converged` = the method met its tolerance AND the
      KKT (and, unless `pontryagin=False`, Pontryagin) checks pass.
    - `hessian_ok`: the reduced Hessian on the free controls is positive definite at
      every stage (a strict local minimum: the implicit derivative exists);
      `min_pivot`: its smallest eigenvalue over the stages; `weakly_active`: the number
      of controls held at a bound whose multiplier is about zero (there the derivative
      is one-sided: the control stays at its bound).

    `controls`, `states`, `costates` and `cost` are differentiable with respect to every
    inexact array of the problem (implicit function theorem at the KKT point; see
    `adjoint.control._implicit`); the derivative is to be trusted where `derivative_ok`.

    A problem with general constraints adds `multipliers` (`Multipliers`: ν for the
    equalities, μ ≥ 0 for the inequalities, per row and stage, in L = C + νᵀg + μᵀh, so
    dC*/d(right-hand side) = −ν, −μ); its `costates` are the Lagrangian's (B = −∂L/∂X,
    the constraints' terms included), `multipliers` are differentiable too, and
    `result` may be `RESULTS.infeasible` (see `message`). `hessian_ok` then says the Newton KKT
    matrix at the solution is non-singular (second-order sufficiency on the active
    constraints' null space is not checked) and `min_pivot` is its σ_min/σ_max.
    """

    controls: Float[Array, "N m"]
    states: Array
    costates: Array
    cost: Scalar
    cost_history: Float[Array, " S"]
    kkt: ControlKKT
    num_steps: Int[Array, ""]
    result: RESULTS
    converged: Bool[Array, ""]
    hessian_ok: Bool[Array, ""]
    min_pivot: Scalar
    weakly_active: Int[Array, ""]
    multipliers: Multipliers | None = None

    @property
    def derivative_ok(self) -> Bool[Array, ""]:
        """A converged solve at a strict local minimum: the implicit derivative holds."""
        return self.converged & self.hessian_ok

    @property
    def message(self) -> str:
        success = bool(self.result == RESULTS.successful)
        text = MESSAGES[SUCCESS] if success else RESULTS[self.result]
        if success and not bool(self.converged):
            text += "; but the KKT / Pontryagin check failed: " + self.kkt.summary()
        if not bool(self.hessian_ok) and self.multipliers is not None:
            text += (
                "; the KKT matrix is singular to working precision (σ_min/σ_max "
                f"{float(self.min_pivot):.1e}): its derivative is not to be trusted"
            )
        elif not bool(self.hessian_ok):
            text += (
                f"; the reduced Hessian is not positive definite (min {float(self.min_pivot):.2e})"
            )
        return text

    @property
    def history(self) -> Array:
        """The cost history without the NaN padding (outside `jit` only)."""
        return self.cost_history[: int(self.num_steps) + 1]

    @property
    def iterations(self) -> Int[Array, ""]:
        """Deprecated name of `num_steps` (removed in the next release)."""
        warnings.warn("Solution.iterations is deprecated: use num_steps", DeprecationWarning, 2)
        return self.num_steps


_THROW = (
    f"control.solve: {MESSAGES[MAX_STEPS]}",
    f"control.solve: {MESSAGES[NONFINITE]}",
    f"control.solve: {MESSAGES[STALLED]}",
    f"control.solve: {MESSAGES[TARGET]}, not an optimum",
    "control.solve: the method met its tolerance but the KKT check failed (see "
    "Solution.kkt.summary())",
    "control.solve: the Pontryagin check failed (pass pontryagin=False where H(k) is not "
    "concave in u)",
    "control.solve: the reduced Hessian on the free controls is not positive definite at "
    "the solution: not a strict local minimum, so its derivative is undefined",
    f"control.solve: {MESSAGES[INFEASIBLE]}",
    f"control.solve: {MESSAGES[UNBOUNDED]}",
)
_THROW_HINT = " (pass throw=False for the flagged Solution)"


def _checked_start(problem: ControlProblem, u0: Array) -> Array:
    """Traced bounds and u_init, checked first inside the compiled solve, before
    anything reads them (concrete ones were checked by `solve` already)."""
    crossed = jnp.any(problem.lower > problem.upper)
    u0 = eqx.error_if(u0, crossed, "ControlProblem: lower > upper")
    outside = (u0 < problem.lower) | (u0 > problem.upper)
    return eqx.error_if(u0, outside.any(), "u_init lies outside the bounds [lower, upper]")


@eqx.filter_jit
def _run(problem: ControlProblem, u0: Array, method: AbstractMethod, tol: float):
    u0 = _checked_start(problem, u0)
    g0 = jax.grad(problem.cost)(u0)
    gtol = gradient_tolerance(tol, projected_gradient_norm(problem, u0, g0), u0.dtype)
    return *method.run(problem, u0, gtol), gtol


@eqx.filter_jit
def _finish(problem, u, history, iterations, result, tol, gtol, pontryagin, throw) -> Solution:
    fixed = _constant(problem)  # the analysis is not differentiated: `attach` is
    cost, states, costates, kkt = analyse(fixed, u, tol, gtol)
    N1, P, n = states.shape
    X, lam = states.reshape(N1, P * n), -costates.reshape(N1, P * n)
    lin = linearise(fixed, X, u, lam, kkt.tolerance)
    checks = kkt.ok if pontryagin else kkt.kkt_ok
    converged = (result == SUCCESS) & checks & jnp.isfinite(cost)
    solution = (u, X, lam, cost)
    if throw:  # checked before `attach`, whose derivative reads it: never optimised away
        index = jnp.where(
            result == UNBOUNDED,
            8,
            jnp.where(
                result != SUCCESS,
                jnp.clip(result - 1, 0, 3),
                jnp.where(~kkt.kkt_ok, 4, jnp.where(~checks, 5, 6)),
            ),
        )
        failed = ~(converged & lin.ok)
        solution = eqx.branched_error_if(solution, failed, index, [m + _THROW_HINT for m in _THROW])
    # the identity on the solution, whose derivative is the implicit one
    u, X, lam, cost = attach(problem, solution, lin.free, lin.active_lower)
    states, costates = X.reshape(N1, P, n), -lam.reshape(N1, P, n)
    if not problem.batched:
        states, costates = states[:, 0], costates[:, 0]
    return Solution(
        u,
        states,
        costates,
        cost,
        history,
        kkt,
        iterations,
        as_results(result),
        converged,
        lin.ok,
        lin.min_pivot,
        lin.weakly_active,
    )


@eqx.filter_jit
def _run_constrained(problem, u0, y0, method, tol):
    return method.run(problem, _checked_start(problem, u0), tol, y0)


@eqx.filter_jit
def _finish_constrained(problem, u, y, history, iterations, result, tol, throw) -> Solution:
    fixed = _constant(problem)
    mult = Multipliers.unflat(fixed, y)
    gtol = tol * _constraints.stationarity_scale(fixed, u)
    _, _, _, kkt = analyse_constrained(fixed, u, mult, tol, gtol)
    active = _constraints.active_set_at(fixed, u, y)
    _, hess, _, J = _constraints._kkt_pieces(fixed, u, y)
    M = _constraints.newton_matrix(fixed, hess, J, active)
    singular_values = jnp.linalg.svd(M, compute_uv=False)
    # singular in floating point: σ_min ≤ size · eps · σ_max
    size = M.shape[0]
    nonsingular = singular_values[-1] > size * jnp.finfo(u.dtype).eps * singular_values[0]
    converged = (result == SUCCESS) & kkt.kkt_ok
    solution = (u, y)
    if throw:
        index = jnp.where(
            result == INFEASIBLE,
            7,
            jnp.where(result != SUCCESS, jnp.clip(result - 1, 0, 3), jnp.where(~kkt.kkt_ok, 4, 6)),
        )
        failed = ~(converged & nonsingular)
        solution = eqx.branched_error_if(solution, failed, index, [m + _THROW_HINT for m in _THROW])
    u, y = _constraints.attach(problem, solution, active)
    mult = Multipliers.unflat(problem, y)
    X = _constraints.rollout(problem, u)
    lam = _constraints.lagrangian_costates(problem, mult, X, u)
    cost = _constraints.plain_cost(problem, u, X)
    weakly = jnp.sum(
        (active.lower | active.upper) & (jnp.abs(kkt.gradient) <= kkt.tolerance)
    ) + jnp.sum(active.rows & ~_constraints.equality_rows(fixed) & (jnp.abs(y) <= kkt.tolerance))
    return Solution(
        u,
        X,
        -lam,
        cost,
        history,
        kkt,
        iterations,
        as_results(result),
        converged,
        nonsingular,
        singular_values[-1] / singular_values[0],
        weakly,
        mult,
    )


def _solve(problem, u0, method, tol, pontryagin, throw) -> Solution:
    # two compiled pieces: the method's loop (on constants: no derivative flows through
    # the iterations), and the analysis with the implicit derivative (shared by all methods)
    fixed = _constant(problem)
    u, history, iterations, result, gtol = _run(fixed, _constant(u0), method, tol)
    return _finish(problem, u, history, iterations, result, tol, gtol, pontryagin, throw)


@no_type_check  # checks its own arguments, naming the one at fault
def solve(
    problem: ControlProblem,
    u_init: Float[Array, "N m"] | None = None,
    method: AbstractMethod | None = None,
    *,
    pontryagin: bool = True,
    throw: bool = True,
    multipliers: Multipliers | None = None,
) -> Solution:
    """Solve min_u C(u) s.t. the dynamics and lower ≤ u ≤ upper, starting from `u_init`.

    **Arguments:**

    - `problem`: a `ControlProblem`.
    - `u_init`: a feasible initial control sequence of shape (N, m); None: zeros
      projected on the box (the control size must then be known from the problem). A
      problem without a control size takes it from `u_init`.
    - `method`: `ILQR()` (default), `ProjectedGradient()` or `GradientDescent(optax...)`.
    - `pontryagin`: whether `converged` also requires the minimum-principle check (a
      necessary condition in discrete time only where H(k) is concave in u in the
      paper's sign; pass False for problems where it is not). It is computed either way.
    - `throw`: raise (an `EquinoxRuntimeError` under `jit`) with the reason when the
      solve did not converge or the solution is no strict local minimum, as optimistix
      does; False returns the flagged `Solution` (`converged`, `hessian_ok`).
    - `multipliers`: for a problem with general constraints, the starting multipliers
      (a `Multipliers`, e.g. a previous `Solution.multipliers`: a warm start); zeros if
      None. Such a problem is solved by `AugmentedLagrangian()` (the default then), and
      `converged` requires the KKT check of the full Lagrangian (the Pontryagin grid is
      reported, not required: with constraints the minimum principle is not a
      necessary condition in discrete time).

    **Returns:** a `Solution` whose costates (paper's sign) come from the core's
    recursion at the final controls and whose `kkt` is checked independently with
    `jax.grad` of the core Lagrangian. Its `controls`, `states`, `costates` and `cost`
    are differentiable (`jax.grad`, `jax.jvp`, `jax.vmap` of either) with respect to every
    inexact array in the problem by the implicit function theorem at the KKT point,
    whatever the method and its number of iterations. Runs under `jit`; raises
    ValueError for a `u_init` of the wrong shape or outside the bounds.
    """
    if not isinstance(problem, ControlProblem):
        raise TypeError(f"problem must be a ControlProblem, got {type(problem).__name__}")
    if method is None:
        from ._ilqr import ILQR

        method = AugmentedLagrangian() if problem.constrained else ILQR()
    if isinstance(method, AugmentedLagrangian) and not problem.constrained:
        method = method.inner  # no constraint rows: the inner method is the whole method
    if problem.constrained and not isinstance(method, AugmentedLagrangian):
        raise TypeError(
            f"control.solve: {type(method).__name__}() ignores the problem's equality/"
            "inequality constraints; use AugmentedLagrangian(inner=...) (the default)"
        )
    if multipliers is not None and not isinstance(multipliers, Multipliers):
        raise TypeError(
            f"multipliers must be a control.Multipliers, got {type(multipliers).__name__}"
        )
    if not isinstance(method, AbstractMethod):
        raise TypeError(
            f"method must be ILQR(), ProjectedGradient() or GradientDescent(...), got "
            f"{type(method).__name__}"
        )
    if u_init is None:
        if problem.control_size is None:
            raise ValueError(
                "control.solve: the control size is unknown; pass u_init of shape (horizon, m), "
                "or build the problem with control_size= or a bound of shape (m,)"
            )
        u_init = problem.project(jnp.zeros((problem.horizon, problem.control_size), problem.dtype))
    elif problem.control_size is None:
        shape = jnp.shape(u_init)
        if len(shape) != 2 or shape[0] != problem.horizon:
            raise ValueError(
                f"u_init must have shape (horizon, m) = ({problem.horizon}, m); got {shape}"
            )
        problem = problem.with_control_size(int(shape[1]))
    check = getattr(method, "check_problem", None)
    if check is not None:  # e.g. ILQR(backward=ParallelRiccati()) needs a problem without bounds
        check(problem)
    u0 = problem.check_controls(u_init)
    if not isinstance(u0, jax.core.Tracer) and not isinstance(problem.lower, jax.core.Tracer):
        outside = (u0 < problem.lower) | (u0 > problem.upper)
        if bool(outside.any()):
            k, i = (int(v[0]) for v in jnp.nonzero(outside))
            raise ValueError(
                f"u_init lies outside the bounds at u({k})[{i}] = {float(u0[k, i])}, bounds "
                f"[{float(problem.lower[k, i])}, {float(problem.upper[k, i])}]; "
                "project it with problem.project(u_init)"
            )
    tol = float(method.tol if method.tol is not None else default_tol(problem.dtype))
    if not problem.constrained:
        return _solve(problem, u0, method, tol, bool(pontryagin), bool(throw))
    y0 = None
    if multipliers is not None:
        want = Multipliers.zeros(problem)
        for name in ("equality", "inequality", "terminal_equality", "terminal_inequality"):
            got, shape = jnp.shape(getattr(multipliers, name)), getattr(want, name).shape
            if got != shape:
                raise ValueError(
                    f"multipliers.{name} must have shape {shape} for this problem; got {got}"
                )
        y0 = _constant(multipliers)
    fixed = _constant(problem)
    u, y, history, iterations, result = _run_constrained(fixed, _constant(u0), y0, method, tol)
    return _finish_constrained(problem, u, y, history, iterations, result, tol, bool(throw))
