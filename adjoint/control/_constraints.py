"""General constraints and their KKT multipliers: the paper's B extended to them.

A `ControlProblem` with stage constraints g(X(k), u(k), k) = 0, h(X(k), u(k), k) ≤ 0 and
terminal ones g_T(X(N)) = 0, h_T(X(N)) ≤ 0 has the Lagrangian

    L = C + Σ_k B(k+1)ᵀ [X(k+1) − f(X(k), u(k), k)]
          + Σ_k [ν(k)ᵀ g(X(k), u(k), k) + μ(k)ᵀ h(X(k), u(k), k)] + ν_Tᵀ g_T(X(N)) + μ_Tᵀ h_T(X(N))

(box bounds on u keep their own multipliers, see `_kkt`). B keeps the paper's sign
(B = −∂L/∂X); ν, μ are the classical Lagrange multipliers with μ ≥ 0, so that the
optimal cost's sensitivity to a constraint's right-hand side (g = b, h ≤ b) is
dC*/db = −ν, −μ. A local minimum satisfies: the forward pass, the costate recursion of
the *Lagrangian* cost ℓ + νᵀg + μᵀh (so B(N) = −∂φ̃/∂X etc.: the constraints feed the
costates), stationarity ∂L/∂u(k) = 0 on the free controls, primal feasibility, dual
feasibility μ ≥ 0 and complementarity μ ⊙ h = 0.

`AugmentedLagrangian` finds such a point in two phases:

1. **Augmented Lagrangian around iLQR** (Hestenes–Powell–Rockafellar): minimise the
   augmented cost ℓ + νᵀg + ρ/2 |g|² + (|max(0, μ + ρh)|² − |μ|²)/(2ρ) (and the terminal
   ones) with the inner method (`ILQR`, box bounds exact), then ν ← ν + ρg,
   μ ← max(0, μ + ρh), and ρ ← 10ρ when the violation did not fall by 4×. The
   regularised iLQR steps make progress where the constraint linearisation is
   degenerate (a car at zero speed cannot move sideways): the penalty is a cost, not a
   linear equation to satisfy.
2. **Newton polish**, once the violation is small: a primal–dual active-set Newton
   method (semismooth Newton, Hintermüller–Ito–Kunisch) on the KKT system in the
   controls (single shooting, the Hessian of L exact), whose active set is
   {rows: μ + h > 0} and {controls: u − ∇_u L outside the box}. It converges
   quadratically to the KKT point, so feasibility reaches the tolerance rather than
   "small"; it is accepted only when it does, else the AL phase goes on.

The same Newton matrix, at the solution, gives the implicit derivative (`attach`): the
KKT system with the active constraints, differentiated in θ. It is dense in N·m (the
number of controls): fine to N·m of about a thousand on a CPU.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from ._base import (
    INFEASIBLE,
    MAX_STEPS,
    NONFINITE,
    RUNNING,
    STALLED,
    SUCCESS,
    TARGET,
    AbstractMethod,
    gradient_tolerance,
    projected_gradient_norm,
    target_of,
)
from ._ilqr import ILQR
from ._implicit import implicit_solution
from ._problem import ControlProblem


class Multipliers(eqx.Module):
    """One entry per constraint row and stage: the Lagrange multipliers ν (equalities),
    μ ≥ 0 (inequalities), in the Lagrangian L = C + νᵀg + μᵀh + … (module docstring),
    so that dC*/d(right-hand side) = −ν, −μ. The same record holds constraint values
    (`constraint_values`).

    - `equality`: (N, p); `inequality`: (N, q);
    - `terminal_equality`: (p_T,); `terminal_inequality`: (q_T,).
    """

    equality: Float[Array, "N p"]
    inequality: Float[Array, "N q"]
    terminal_equality: Float[Array, " pT"]
    terminal_inequality: Float[Array, " qT"]

    @classmethod
    def zeros(cls, problem: ControlProblem) -> "Multipliers":
        p, q, p_T, q_T = problem.constraint_sizes
        N, dtype = problem.horizon, problem.dtype
        return cls(
            jnp.zeros((N, p), dtype),
            jnp.zeros((N, q), dtype),
            jnp.zeros((p_T,), dtype),
            jnp.zeros((q_T,), dtype),
        )

    def flat(self) -> Float[Array, " rows"]:
        """All rows in one vector: equality, inequality, terminal equality, terminal
        inequality."""
        return jnp.concatenate(
            [
                self.equality.reshape(-1),
                self.inequality.reshape(-1),
                self.terminal_equality,
                self.terminal_inequality,
            ]
        )

    @classmethod
    def unflat(cls, problem: ControlProblem, y: Array) -> "Multipliers":
        p, q, p_T, q_T = problem.constraint_sizes
        N = problem.horizon
        a, b, c = N * p, N * (p + q), N * (p + q) + p_T
        return cls(y[:a].reshape(N, p), y[a:b].reshape(N, q), y[b:c], y[c:])


def equality_rows(problem: ControlProblem) -> Bool[Array, " rows"]:
    """Which rows of `Multipliers.flat` are equalities (always active)."""
    p, q, p_T, q_T = problem.constraint_sizes
    N = problem.horizon
    return jnp.concatenate(
        [
            jnp.ones(N * p, bool),
            jnp.zeros(N * q, bool),
            jnp.ones(p_T, bool),
            jnp.zeros(q_T, bool),
        ]
    )


# ----------------------------------------------------------------------- plain forward
def rollout(problem: ControlProblem, u: Float[Array, "N m"]) -> Float[Array, "N+1 n"]:
    """X(0..N) of a single-state problem by a plain `lax.scan` (any-order derivatives)."""
    ks = jnp.arange(problem.horizon, dtype=jnp.int32)

    def step(x, inp):
        uk, k = inp
        return problem.f(x, uk, k), x

    xN, xs = jax.lax.scan(step, problem.x0[0], (u, ks))
    return jnp.concatenate([xs, xN[None]])


def plain_cost(problem: ControlProblem, u, X=None):
    """C(u) = Σ ℓ + φ on the plain rollout."""
    X = rollout(problem, u) if X is None else X
    ks = jnp.arange(problem.horizon, dtype=jnp.int32)
    return jnp.sum(jax.vmap(problem.ell)(X[:-1], u, ks)) + problem.phi(X[-1])


def constraint_values(problem: ControlProblem, u, X=None) -> Multipliers:
    """g, h on every stage and g_T, h_T on X(N), in a `Multipliers`-shaped record."""
    X = rollout(problem, u) if X is None else X
    N, dtype = problem.horizon, problem.dtype
    ks = jnp.arange(N, dtype=jnp.int32)
    p, q, p_T, q_T = problem.constraint_sizes

    def stage(fn, rows):
        if fn is None:
            return jnp.zeros((N, rows), dtype)
        return jnp.asarray(jax.vmap(fn)(X[:-1], u, ks), dtype)

    def terminal(fn, rows):
        return jnp.zeros((rows,), dtype) if fn is None else jnp.asarray(fn(X[-1]), dtype)

    return Multipliers(
        stage(problem.equality, p),
        stage(problem.inequality, q),
        terminal(problem.terminal_equality, p_T),
        terminal(problem.terminal_inequality, q_T),
    )


def violation(values: Multipliers):
    """max |g|, max(h, 0) over every row: 0 for a feasible point."""
    eq = jnp.concatenate([values.equality.reshape(-1), values.terminal_equality])
    ineq = jnp.concatenate([values.inequality.reshape(-1), values.terminal_inequality])
    return jnp.maximum(
        jnp.max(jnp.abs(eq), initial=0.0), jnp.max(jnp.maximum(ineq, 0), initial=0.0)
    )


# ----------------------------------------------------------------------- Lagrangian costs
def _equality_term(g, nu, rho):
    value = nu @ g
    return value if rho is None else value + 0.5 * rho * (g @ g)


def _inequality_term(h, mu, rho):
    if rho is None:
        return mu @ h
    return (jnp.sum(jnp.maximum(0, mu + rho * h) ** 2) - jnp.sum(mu**2)) / (2 * rho)


class _StageLagrangian(eqx.Module):
    """ℓ + νᵀg + μᵀh (rho None), or the augmented ℓ + νᵀg + ρ/2|g|² + PHR(h) term."""

    running_cost: Callable
    equality: Callable | None
    inequality: Callable | None
    nu: Array | None
    mu: Array | None
    rho: Array | None

    def __call__(self, x, u, k):
        value = self.running_cost(x, u, k)
        if self.equality is not None:
            value = value + _equality_term(self.equality(x, u, k), self.nu[k], self.rho)
        if self.inequality is not None:
            value = value + _inequality_term(self.inequality(x, u, k), self.mu[k], self.rho)
        return value


class _TerminalLagrangian(eqx.Module):
    terminal_cost: Callable
    equality: Callable | None
    inequality: Callable | None
    nu: Array | None
    mu: Array | None
    rho: Array | None

    def __call__(self, x):
        value = self.terminal_cost(x)
        if self.equality is not None:
            value = value + _equality_term(self.equality(x), self.nu, self.rho)
        if self.inequality is not None:
            value = value + _inequality_term(self.inequality(x), self.mu, self.rho)
        return value


def lagrangian_problem(problem: ControlProblem, mult: Multipliers, rho=None) -> ControlProblem:
    """The problem whose running and terminal costs are the Lagrangian's (ρ None) or the
    augmented Lagrangian's (penalty ρ) at fixed multipliers. Its cost is L (or L_ρ), its
    core costate recursion gives the costates of the constrained problem."""
    # absent constraints carry no (zero-size) multiplier leaves
    some = lambda fn, value: None if fn is None else value
    running = _StageLagrangian(
        problem.running_cost,
        problem.equality,
        problem.inequality,
        some(problem.equality, mult.equality),
        some(problem.inequality, mult.inequality),
        rho,
    )
    terminal = _TerminalLagrangian(
        problem.terminal_cost,
        problem.terminal_equality,
        problem.terminal_inequality,
        some(problem.terminal_equality, mult.terminal_equality),
        some(problem.terminal_inequality, mult.terminal_inequality),
        rho,
    )
    return eqx.tree_at(lambda p: (p.running_cost, p.terminal_cost), problem, (running, terminal))


def lagrangian_costates(problem: ControlProblem, mult: Multipliers, X, u):
    """λ(0..N) = ∂L/∂X(k) (internal sign, = −B) of the Lagrangian, by the costate
    recursion λ(N) = ∂φ̃/∂X, λ(k) = ∂ℓ̃/∂X + f_Xᵀ λ(k+1) (a plain scan: any-order
    derivatives)."""
    lagr = lagrangian_problem(problem, mult)
    ks = jnp.arange(problem.horizon, dtype=jnp.int32)
    lam_N = jax.grad(lagr.phi)(X[-1])

    def step(lam_next, inp):
        x, uk, k = inp
        lam = jax.grad(lambda x_: lagr.ell(x_, uk, k) + lam_next @ lagr.f(x_, uk, k))(x)
        return lam, lam

    _, lams = jax.lax.scan(step, lam_N, (X[:-1], u, ks), reverse=True)
    return jnp.concatenate([lams, lam_N[None]])


# ----------------------------------------------------------------------- Newton system
class ActiveSet(eqx.Module):
    """Controls held at their lower / upper bound, and the constraint rows in the
    Newton system (every equality, the active inequalities)."""

    lower: Bool[Array, "N m"]
    upper: Bool[Array, "N m"]
    rows: Bool[Array, " rows"]


def _kkt_pieces(problem: ControlProblem, u, y):
    """∇_u L, ∇²_uu L, c(u), ∂c/∂u at (u, y) for L(u) = C(u) + yᵀ c(u) (single shooting)."""
    shape = u.shape

    def c_of(v):
        return constraint_values(problem, v.reshape(shape)).flat()

    def lag(v, y_):
        return plain_cost(problem, v.reshape(shape)) + y_ @ c_of(v)

    v = u.reshape(-1)
    grad = jax.grad(lag)(v, y)
    hess = jax.hessian(lag)(v, y)
    c, J = c_of(v), jax.jacfwd(c_of)(v)
    return grad, 0.5 * (hess + hess.T), c, J


def stationarity_scale(problem: ControlProblem, u):
    """1 + ‖∇C(u)‖∞: the scale of the Lagrangian's gradient terms (invariant to adding a
    constant to C), against which stationarity is measured with constraints."""
    return 1 + jnp.max(jnp.abs(jax.grad(plain_cost, argnums=1)(problem, u)))


def natural_residual(problem: ControlProblem, u, y, grad, c):
    """The KKT residual as one vector that is zero exactly at a KKT point: u − Π(u − ∇L)
    for the box (stationarity and the bound multipliers' signs), g for equalities and
    min(−h, μ) for inequalities (feasibility, μ ≥ 0, complementarity)."""
    eq = equality_rows(problem)
    flat_u = u.reshape(-1)
    r_u = flat_u - jnp.clip(flat_u - grad, problem.lower.reshape(-1), problem.upper.reshape(-1))
    r_c = jnp.where(eq, c, jnp.minimum(-c, y))
    return r_u, r_c


def newton_matrix(problem, hess, J, active: ActiveSet):
    """[[H, Jᵀ], [J, 0]] with the rows of box-active controls and inactive constraints
    replaced by identity rows (δu = bound − u there, δy = −y)."""
    nu = hess.shape[0]
    rows = J.shape[0]
    held = (active.lower | active.upper).reshape(-1)
    top = jnp.concatenate([hess, J.T], 1)
    bottom = jnp.concatenate([J, jnp.zeros((rows, rows), hess.dtype)], 1)
    M = jnp.concatenate([top, bottom], 0)
    fixed = jnp.concatenate([held, ~active.rows])
    eye = jnp.eye(nu + rows, dtype=hess.dtype)
    return jnp.where(fixed[:, None], eye, M)


def _active_set(problem, u, y, grad, c) -> ActiveSet:
    """Primal–dual active set: controls whose u − ∇L leaves the box, rows with μ + h > 0."""
    z = u - grad.reshape(u.shape)
    return ActiveSet(z < problem.lower, z > problem.upper, equality_rows(problem) | (y + c > 0))


def _gradient_and_values(problem: ControlProblem, u, y):
    """∇_u L and c(u) at (u, y): what the residual needs, without second derivatives."""
    shape = u.shape

    def lag(v):
        c = constraint_values(problem, v.reshape(shape)).flat()
        return plain_cost(problem, v.reshape(shape)) + y @ c, c

    grad, c = jax.grad(lag, has_aux=True)(u.reshape(-1))
    return grad, c


def newton_polish(problem: ControlProblem, u, y, tol, steps: int):
    """Primal–dual active-set Newton on the KKT system from (u, y) (see the module
    docstring), each step shortened (1, ½, ¼, ⅛) until the natural residual falls; no
    such step ends the try. **Returns:** `(u, y, residual, ok)`: `ok` when the residual
    fell below `tol` (stationarity relative to 1 + ‖∇C‖∞, feasibility absolute) in
    `steps` iterations, every value finite."""
    eq = equality_rows(problem)

    def residual(u, y):
        # stationarity relative to 1 + ‖∇C‖∞, the constraint rows absolute: one number,
        # ≤ tol exactly when both tests pass
        grad, c = _gradient_and_values(problem, u, y)
        r_u, r_c = natural_residual(problem, u, y, grad, c)
        scale = stationarity_scale(problem, u)
        r = jnp.maximum(jnp.max(jnp.abs(r_u)) / scale, jnp.max(jnp.abs(r_c), initial=0.0))
        return jnp.where(jnp.isfinite(r), r, jnp.inf)

    def body(state):
        i, u, y, r, _ = state
        grad, hess, c, J = _kkt_pieces(problem, u, y)
        active = _active_set(problem, u, y, grad, c)
        M = newton_matrix(problem, hess, J, active)
        flat_u = u.reshape(-1)
        to_bound = jnp.where(
            active.lower.reshape(-1),
            problem.lower.reshape(-1) - flat_u,
            problem.upper.reshape(-1) - flat_u,
        )
        held = (active.lower | active.upper).reshape(-1)
        rhs = jnp.concatenate([jnp.where(held, to_bound, -grad), jnp.where(active.rows, -c, -y)])
        step = jnp.linalg.solve(M, rhs)
        du, dy = step[: flat_u.size].reshape(u.shape), step[flat_u.size :]

        def trial(alpha):
            u_t = u + alpha * du
            # inactive rows get exactly zero, active inequalities stay ≥ 0
            y_t = y + alpha * dy
            y_t = jnp.where(eq, y_t, jnp.where(active.rows, jnp.maximum(y_t, 0), 0))
            return u_t, y_t, residual(u_t, y_t)

        def shorten(ls):
            j, _, _, _ = ls
            return (j + 1, *trial(0.5 ** (j + 1)))

        u_t, y_t, r_t = trial(1.0)
        _, u_t, y_t, r_t = jax.lax.while_loop(
            lambda ls: (ls[3] >= r) & (ls[0] < 3), shorten, (0, u_t, y_t, r_t)
        )
        moved = r_t < r
        keep = lambda new, old: jnp.where(moved, new, old)
        return i + 1, keep(u_t, u), keep(y_t, y), keep(r_t, r), moved

    r0 = residual(u, y)
    go = lambda s: (s[3] > tol) & s[4] & (s[0] < steps)
    _, u_p, y_p, r, _ = jax.lax.while_loop(go, body, (jnp.array(0), u, y, r0, jnp.array(True)))
    ok = (r <= tol) & jnp.all(jnp.isfinite(u_p))
    u_p = jnp.clip(u_p, problem.lower, problem.upper)
    return u_p, y_p, r, ok


def active_set_at(problem: ControlProblem, u, y) -> ActiveSet:
    """The active set at a KKT point (for the implicit derivative)."""
    grad, _, c, _ = _kkt_pieces(problem, u, y)
    return _active_set(problem, u, y, grad, c)


# ----------------------------------------------------------------------- the method
class AugmentedLagrangian(AbstractMethod):
    """Augmented Lagrangian around iLQR, then a Newton polish of the KKT system (module
    docstring): the default method of a problem with `equality`/`inequality`
    constraints.

    **Arguments:**

    - `inner`: the method for each augmented subproblem (`ILQR(max_steps=50)`; any
      method of `solve` that handles the box).
    - `max_steps`: outer (multiplier-update) iterations.
    - `tol`: the KKT tolerance: stationarity relative to 1 + ‖∇C‖∞, the constraint
      violation absolute (None: 1e-8 in float64, 1e-4 in float32); each augmented
      subproblem is solved to `tol` relative to its projected gradient at its start.
    - `penalty_init`, `penalty_factor`, `penalty_max`: ρ, its growth when the violation
      does not fall by 4× in an outer iteration, and its cap: at the cap with no
      progress the result is `INFEASIBLE`.
    - `polish_from`: try the Newton polish once the violation is below this.
    - `polish_steps`: Newton iterations per try (0: no polish, AL only).
    - `cost_target`: as for the other methods.
    """

    inner: AbstractMethod = ILQR(max_steps=50)
    max_steps: int = 40
    tol: float | None = None
    penalty_init: float = 10.0
    penalty_factor: float = 10.0
    penalty_max: float = 1e9
    polish_from: float = 1e-2
    polish_steps: int = 12
    cost_target: float | Array | None = None

    def run(self, problem, u0, tol, multipliers=None):
        """From `u0` (feasible for the box) and the multipliers (warm start; zeros if
        None). **Returns:** `(u, y, history, iterations, status)` with y the flat
        multipliers (`Multipliers.flat`)."""
        dtype = u0.dtype
        y0 = (Multipliers.zeros(problem) if multipliers is None else multipliers).flat()
        y0 = jnp.asarray(y0, dtype)
        eq = equality_rows(problem)
        y0 = jnp.where(eq, y0, jnp.maximum(y0, 0))
        target = target_of(self)
        history = jnp.full(self.max_steps + 1, jnp.nan, dtype).at[0].set(plain_cost(problem, u0))
        rho0 = jnp.asarray(self.penalty_init, dtype)
        viol0 = violation(constraint_values(problem, u0))

        def polish(u, y):
            if self.polish_steps <= 0:
                return u, y, jnp.array(False)
            up, yp, _, ok = newton_polish(problem, u, y, tol, self.polish_steps)
            return up, yp, ok

        # a start that already is a KKT point (warm start) needs no AL iteration
        u_s, y_s, ok0 = jax.lax.cond(
            viol0 <= self.polish_from, polish, lambda u, y: (u, y, jnp.array(False)), u0, y0
        )
        status0 = jnp.where(ok0, SUCCESS, jnp.where(self.max_steps <= 0, MAX_STEPS, RUNNING))
        u0 = jnp.where(ok0, u_s, u0)
        y0 = jnp.where(ok0, y_s, y0)
        stalled0 = jnp.array(0)
        carry = (jnp.array(0), u0, y0, rho0, viol0, stalled0, history, status0)

        def body(carry):
            i, u, y, rho, viol_prev, stalled, history, _ = carry
            mult = Multipliers.unflat(problem, y)
            augmented = lagrangian_problem(problem, mult, rho)
            # each subproblem to a relative tolerance that follows the violation: more
            # accuracy than the constraints have yet is wasted (the polish ends it)
            pg = projected_gradient_norm(augmented, u, jax.grad(augmented.cost)(u))
            inner_tol = jnp.clip(0.1 * viol_prev, tol, 1e-2)
            u_new, _, _, inner_status = self.inner.run(
                augmented, u, gradient_tolerance(inner_tol, pg, dtype)
            )
            values = constraint_values(problem, u_new)
            viol = violation(values)
            v = values.flat()
            y_new = jnp.where(eq, y + rho * v, jnp.maximum(0, y + rho * v))
            cost = plain_cost(problem, u_new)
            finite = jnp.isfinite(cost) & jnp.isfinite(viol) & jnp.all(jnp.isfinite(y_new))
            # ρ grows only when the subproblem was solved and the violation did not fall
            # by 4×; at the cap, three such outer iterations in a row mean infeasible
            solved = (inner_status == SUCCESS) | (inner_status == STALLED)
            progress = viol <= 0.25 * viol_prev
            at_cap = rho >= self.penalty_max
            stalled = jnp.where(progress | ~at_cap | ~solved, 0, stalled + 1)
            rho_new = jnp.where(
                progress | ~solved, rho, jnp.minimum(rho * self.penalty_factor, self.penalty_max)
            )
            u_p, y_p, ok = jax.lax.cond(
                finite & (viol <= self.polish_from),
                polish,
                lambda u, y: (u, y, jnp.array(False)),
                u_new,
                y_new,
            )
            u_out = jnp.where(ok, u_p, u_new)
            y_out = jnp.where(ok, y_p, y_new)
            i = i + 1
            c_out = plain_cost(problem, u_out)
            history = history.at[i].set(c_out)
            infeasible = (stalled >= 3) & (viol > tol)
            status = jnp.where(
                ~finite,
                NONFINITE,
                jnp.where(
                    ok,
                    SUCCESS,
                    jnp.where(
                        (c_out <= target) & (viol <= tol),
                        TARGET,
                        jnp.where(
                            infeasible,
                            INFEASIBLE,
                            jnp.where(i >= self.max_steps, MAX_STEPS, RUNNING),
                        ),
                    ),
                ),
            )
            keep = lambda new, old: jnp.where(finite, new, old)
            return (
                i,
                keep(u_out, u),
                keep(y_out, y),
                rho_new,
                viol,
                stalled,
                history,
                status,
            )

        i, u, y, _, _, _, history, status = jax.lax.while_loop(
            lambda c: c[-1] == RUNNING, body, carry
        )
        return u, y, history, i, status


# ----------------------------------------------------------------------- derivatives
def attach(problem: ControlProblem, solution, active: ActiveSet):
    """`solution = (u, y)` as a function of `problem`, whose derivative is the implicit
    derivative at the KKT point with the active set held: the Newton matrix of
    `newton_matrix` applied to the θ-derivative of (∇_u L, c_A), with the held controls
    moving with their bound (the rule of `_implicit.implicit_solution`)."""
    return implicit_solution(problem, solution, active, _newton_tangent)


def _newton_tangent(problem: ControlProblem, t_problem, solution, active: ActiveSet):
    u, y = solution
    shape = u.shape

    def pieces(prob):
        grad, _, c, _ = _kkt_pieces(prob, u, y)
        return grad, c

    (grad, c), t_pieces = eqx.filter_jvp(pieces, (problem,), (t_problem,))
    t_grad, t_c = jax.tree_util.tree_map(
        lambda t, x: jnp.zeros_like(x) if t is None else t,
        t_pieces if t_pieces is not None else (None, None),
        (grad, c),
        is_leaf=lambda x: x is None,
    )
    _, hess, _, J = _kkt_pieces(problem, u, y)
    M = newton_matrix(problem, hess, J, active)
    lo_dot = jnp.zeros(shape, u.dtype) if t_problem.lower is None else t_problem.lower
    hi_dot = jnp.zeros(shape, u.dtype) if t_problem.upper is None else t_problem.upper
    bound_dot = jnp.where(active.lower, lo_dot, hi_dot).reshape(-1)
    held = (active.lower | active.upper).reshape(-1)
    rhs = jnp.concatenate([jnp.where(held, bound_dot, -t_grad), jnp.where(active.rows, -t_c, 0)])
    step = jnp.linalg.solve(M, rhs)
    return step[: u.size].reshape(shape), step[u.size :]
