"""Derivatives of an optimal solution by the implicit function theorem at its KKT point.

In the internal sign λ = ∂C/∂X = −B, a solution (X*, u*, λ*) of a `ControlProblem` with
parameters θ (every inexact array in the problem) zeroes the KKT residual r(X, u, λ; θ):

    X(0) − x0(θ),  X(k+1) − f(X(k), u(k), k; θ)                      (∂L/∂B = 0, forward)
    λ(N) − φ_X(X(N); θ),  λ(k) − H_X(k)                               (∂L/∂X = 0, costates)
    H_u(k) on the free controls,  u(k) − bound(θ) on the active ones  (∂L/∂u = 0, optimality)

with the stage Hamiltonian H(k) = ℓ(X(k), u(k), k) + λ(k+1)ᵀ f(X(k), u(k), k). Perturbing θ
by θ̇ and differentiating r = 0 gives (Ẋ, u̇, λ̇) as the solution of the KKT system of an
LQ problem whose data are the exact second derivatives at the solution,

    min Σ_k ½ [δX; δu]ᵀ [Q Sᵀ; S R] [δX; δu] + q(k)ᵀδX + r(k)ᵀδu + ½ δX(N)ᵀ Q_N δX(N) + q_Nᵀ δX(N)
    s.t. δX(k+1) = A δX(k) + B δu(k) + c(k+1),  δX(0) = c(0),  δu_a(k) = d(k) (active),

    A = f_X, B = f_u, Q = H_XX, S = H_uX, R = H_uu (the DDP terms λᵀf_XX … included),
    Q_N = φ_XX, and (c, q, r, d) = the θ-derivative of the residual in the direction θ̇,

and λ̇ is its costate. That is one Riccati sweep backward and one rollout forward: the
iLQR backward pass run once, O(N) in time and memory whatever the number of iterations
of the solver that found the point, and the same for every method (it depends only on
the solution). The Riccati gains depend on the solution alone; the sweeps are linear in
(c, q, r, d), so JAX transposes them into the reverse-mode pass: the same symmetric KKT
system with the incoming cotangents as its linear terms (trajax's `_ilqr_tvlqr_vjp`,
extended here to the dynamics, x0 and the bounds). Forward mode is the JVP itself.

The optimal cost needs no solve (envelope theorem): Ċ* = ∂L/∂θ · θ̇ at (X*, u*, λ*),
where L = Σ ℓ + φ + Σ λ(k+1)ᵀ(f − X(k+1)) + λ(0)ᵀ(x0 − X(0)) plus the bound terms, whose
multipliers are H_u on the active controls. So dC*/dx0 = λ(0) = −B(0).

When not to trust it: the reduced Hessian on the free controls must be positive definite
(each R + Bᵀ P B restricted to the free controls, the Riccati pass's pivot): otherwise the
point is no strict local minimum and the derivative is not defined. Then `ok` is False
and the derivative is NaN rather than a division by a singular matrix. A control at a
bound whose multiplier is about zero (weakly active) makes the derivative one-sided: it
is held at the bound and counted in `weakly_active`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jaxtyping import Array, Bool, Float, Int, Scalar

from ._problem import ControlProblem


def _sym(M):
    return 0.5 * (M + jnp.swapaxes(M, -1, -2))


class KKTLinearisation(eqx.Module):
    """The LQ problem of the module docstring at a solution, with its Riccati gains.

    States are stacked over the batch of initial states: n = P · n_x.

    - `A`, `B`, `Q`, `S`, `R`: f_X, f_u, H_XX, H_uX, H_uu per stage (N, ·, ·); `Q_N` = φ_XX.
    - `free`: controls not held at a bound (N, m); `active_lower`: held at the lower one.
    - `P`: V_XX(0..N) of the LQ problem; `K`: feedback gains (zero on active controls);
      `chol`: Cholesky factors of the reduced Hessians (identity on active controls).
    - `ok`: every reduced Hessian is positive definite (strict local minimum).
    - `min_pivot`: the smallest eigenvalue of the reduced Hessians (≤ 0: not a minimum).
    - `weakly_active`: controls at a bound whose multiplier is within the tolerance of 0.
    """

    A: Float[Array, "N n n"]
    B: Float[Array, "N n m"]
    Q: Float[Array, "N n n"]
    S: Float[Array, "N m n"]
    R: Float[Array, "N m m"]
    Q_N: Float[Array, "n n"]
    free: Bool[Array, "N m"]
    active_lower: Bool[Array, "N m"]
    P: Float[Array, "N+1 n n"]
    K: Float[Array, "N m n"]
    chol: Float[Array, "N m m"]
    ok: Bool[Array, ""]
    min_pivot: Scalar
    weakly_active: Int[Array, ""]


def residual(problem: ControlProblem, X, u, lam):
    """The KKT residual of the module docstring (before the active-set split of ∂L/∂u),
    and the Lagrangian L, at stacked states X (N+1, n), controls u (N, m), costates
    λ = ∂C/∂X (N+1, n).

    **Returns:** `((r_dyn, r_cost, r_u), L)`, with r_dyn, r_cost of shape (N+1, n) and
    r_u = H_u of shape (N, m).
    """
    F, L, Phi = problem.stacked()
    ks = jnp.arange(problem.horizon, dtype=jnp.int32)

    def H(Xk, uk, lam_next, k):
        return L(Xk, uk, k) + lam_next @ F(Xk, uk, k)

    Hx, Hu = jax.vmap(jax.grad(H, argnums=(0, 1)))(X[:-1], u, lam[1:], ks)
    f = jax.vmap(F)(X[:-1], u, ks)
    r_dyn = jnp.concatenate([(X[0] - problem.x0.reshape(-1))[None], X[1:] - f])
    r_cost = jnp.concatenate([lam[:-1] - Hx, (lam[-1] - jax.grad(Phi)(X[-1]))[None]])
    lagrangian = (
        jnp.sum(jax.vmap(L)(X[:-1], u, ks))
        + Phi(X[-1])
        + jnp.sum(lam[1:] * (f - X[1:]))
        + lam[0] @ (problem.x0.reshape(-1) - X[0])
    )
    return (r_dyn, r_cost, Hu), lagrangian


def active_set(problem: ControlProblem, u, Hu, tolerance):
    """Which controls are held at a bound (within `tolerance` of it), which of those at
    the lower one, and how many are weakly active (multiplier |H_u| within `tolerance`
    of zero as well: there the derivative is one-sided)."""
    at_lower = u - problem.lower <= tolerance
    at_upper = problem.upper - u <= tolerance
    free = ~(at_lower | at_upper)
    weakly = jnp.sum((~free) & (jnp.abs(Hu) <= tolerance))
    return free, at_lower & ~at_upper, weakly


def linearise(problem: ControlProblem, X, u, lam, tolerance=None, *, free=None, lower=None):
    """The LQ data and Riccati gains at a solution (stacked X, λ; see `residual`), with
    the active set from `active_set(…, tolerance)` or given as `free`, `lower`."""
    F, L, Phi = problem.stacked()
    ks = jnp.arange(problem.horizon, dtype=jnp.int32)

    def stage(Xk, uk, lam_next, k):
        H = lambda X_, u_: L(X_, u_, k) + lam_next @ F(X_, u_, k)
        (Hxx, Hxu), (Hux, Huu) = jax.hessian(H, argnums=(0, 1))(Xk, uk)
        fx, fu = jax.jacfwd(F, argnums=(0, 1))(Xk, uk, k)
        Hu = jax.grad(H, argnums=1)(Xk, uk)
        return fx, fu, _sym(Hxx), Hux, _sym(Huu), Hu

    A, B, Q, S, R, Hu = jax.vmap(stage)(X[:-1], u, lam[1:], ks)
    Q_N = _sym(jax.hessian(Phi)(X[-1]))
    if free is None:
        free, lower, weakly = active_set(problem, u, Hu, tolerance)
    else:
        weakly = jnp.zeros((), jnp.int32)

    m = u.shape[-1]
    eye = jnp.eye(m, dtype=u.dtype)

    def step(Pn, inp):
        A_, B_, Q_, S_, R_, fr = inp
        H = _sym(R_ + B_.T @ Pn @ B_)
        G = S_ + B_.T @ Pn @ A_
        ff = fr[:, None] & fr[None, :]
        Hm = jnp.where(ff, H, eye)
        pivot = jnp.min(jnp.linalg.eigvalsh(Hm))
        chol = jnp.linalg.cholesky(Hm)
        pd = jnp.all(jnp.isfinite(chol)) & (pivot > 0)
        # the gains go on with a safe factor, so that the pivots of earlier stages stay
        # meaningful; the derivative itself is NaN, never a division by a singular matrix
        K = -jsl.cho_solve((jnp.where(pd, chol, eye), True), jnp.where(fr[:, None], G, 0))
        P_ = _sym(Q_ + A_.T @ Pn @ A_ + G.T @ K)
        chol = jnp.where(pd, chol, jnp.nan)
        return P_, (P_, K, chol, pd, jnp.where(jnp.any(fr), pivot, jnp.inf))

    _, (Ps, K, chol, pd, pivots) = jax.lax.scan(step, Q_N, (A, B, Q, S, R, free), reverse=True)
    return KKTLinearisation(
        A=A,
        B=B,
        Q=Q,
        S=S,
        R=R,
        Q_N=Q_N,
        free=free,
        active_lower=lower,
        P=jnp.concatenate([Ps, Q_N[None]]),
        K=K,
        chol=chol,
        ok=jnp.all(pd),
        min_pivot=jnp.min(pivots),
        weakly_active=weakly,
    )


def lq_solve(lin: KKTLinearisation, c, q, r, d):
    """Solve the LQ problem's KKT system for the linear terms (c, q, r, d): c (N+1, n)
    the dynamics offsets with c(0) = δX(0), q (N+1, n) the state terms with q(N) the
    terminal one, r (N, m), d (N, m) the values of the active controls (zero on free
    ones). Linear in (c, q, r, d): the Riccati gains are fixed.

    **Returns:** `(δX (N+1, n), δu (N, m), δλ (N+1, n))`.
    """

    def backward(pn, inp):
        A, B, S, R, Pn, chol, fr, c_next, qk, rk, dk = inp
        h = rk + B.T @ (Pn @ c_next + pn)
        Hd = R @ dk + B.T @ (Pn @ (B @ dk))
        kappa = jsl.cho_solve((chol, True), jnp.where(fr, -(h + Hd), dk))
        p = S.T @ kappa + qk + A.T @ (Pn @ (B @ kappa + c_next) + pn)
        return p, (p, kappa)

    inputs = (lin.A, lin.B, lin.S, lin.R, lin.P[1:], lin.chol, lin.free, c[1:], q[:-1], r, d)
    _, (p, kappa) = jax.lax.scan(backward, q[-1], inputs, reverse=True)
    p = jnp.concatenate([p, q[-1][None]])

    def forward(dx, inp):
        A, B, K, kap, c_next = inp
        du = K @ dx + kap
        return A @ dx + B @ du + c_next, (dx, du)

    dxN, (dx, du) = jax.lax.scan(forward, c[0], (lin.A, lin.B, lin.K, kappa, c[1:]))
    dx = jnp.concatenate([dx, dxN[None]])
    dlam = jnp.einsum("kij,kj->ki", lin.P, dx) + p
    return dx, du, dlam


@eqx.filter_custom_jvp
def implicit_solution(problem: ControlProblem, solution, active, tangent):
    """The identity on a solve's `solution`, whose JVP with respect to `problem` is
    `tangent(problem, t_problem, solution, active)`: the implicit derivative of the KKT
    conditions at the solution with its active set `active` held fixed. The package's
    one hand-written derivative rule for control solves; `tangent` solves the linearised
    KKT system with the structure at hand (`attach`: Riccati, the unconstrained and
    box-constrained case; `_constraints.attach`: the Newton matrix of general
    constraints). `solution` is treated as a constant (it was computed without
    derivatives); `tangent` receives it through `implicit_solution` again, so
    derivatives of any order see the solution move with the problem."""
    del active, tangent
    return solution


@implicit_solution.def_jvp
def _implicit_solution_jvp(primals, tangents):
    problem, solution, active, tangent = primals
    t_problem = tangents[0]
    if t_problem is None:
        t_problem = jax.tree_util.tree_map(lambda _: None, problem)
    moving = implicit_solution(problem, solution, active, tangent)
    return solution, tangent(problem, t_problem, moving, active)


def attach(problem: ControlProblem, solution, free, lower):
    """`solution = (u, X, λ, C)` (stacked X, λ) as a function of `problem` whose
    derivative is the implicit derivative of the module docstring, with the active set
    (`free`, `lower`) held fixed."""
    return implicit_solution(problem, solution, (free, lower), _riccati_tangent)


def _riccati_tangent(problem: ControlProblem, t_problem, solution, active):
    free, lower = active
    u, X, lam, _ = solution
    lin = linearise(problem, X, u, lam, free=free, lower=lower)

    def r_of(prob):
        return residual(prob, X, u, lam)

    ((r_dyn, r_cost, Hu), L), t_r = eqx.filter_jvp(r_of, (problem,), (t_problem,))
    if t_r is None:
        t_r = ((None, None, None), None)
    (t_dyn, t_cost, t_u), t_L = jax.tree_util.tree_map(
        lambda t, x: jnp.zeros_like(x) if t is None else t,
        t_r,
        ((r_dyn, r_cost, Hu), L),
        is_leaf=lambda x: x is None,
    )
    lo_dot = jnp.zeros_like(u) if t_problem.lower is None else t_problem.lower
    hi_dot = jnp.zeros_like(u) if t_problem.upper is None else t_problem.upper
    d = jnp.where(free, 0, jnp.where(lower, lo_dot, hi_dot))
    dx, du, dlam = lq_solve(lin, -t_dyn, -t_cost, t_u, d)
    # envelope theorem: Ċ = ∂L/∂θ·θ̇, the bound multipliers being H_u on active controls
    dC = t_L + jnp.sum(jnp.where(free, 0, Hu) * d)
    return du, dx, dlam, dC
