"""iLQR / box-DDP: the costate recursion carried to second order.

Around the current trajectory (X(k), u(k)), with V the cost-to-go, the backward pass is

    Q_X  = ℓ_X + f_Xᵀ V_X'          Q_u  = ℓ_u + f_uᵀ V_X'        (the costate recursion)
    Q_XX = ℓ_XX + f_Xᵀ V_XX' f_X    Q_uu = ℓ_uu + f_uᵀ V_XX' f_u   Q_uX = ℓ_uX + f_uᵀ V_XX' f_X
           (+ V_X' · f_XX, f_uu, f_uX for DDP)                       (its second-order part)
    δu   = argmin_{lower − u ≤ δu ≤ upper − u}  ½ δuᵀ(Q_uu + μI)δu + Q_uᵀ δu   (box QP)
    K    = −(Q_uu + μI)_ff⁻¹ Q_uX,f  on the free controls, 0 on the clamped ones
    V_X  = Q_X + Kᵀ Q_uu δu + Kᵀ Q_u + Q_uXᵀ δu
    V_XX = Q_XX + Kᵀ Q_uu K + Kᵀ Q_uX + Q_uXᵀ K

V_X is λ = −B carried to second order: at a stationary point (δu = 0) it is exactly the
costate of the paper, and Q_u = dC/du(k) = −∂H(k)/∂u. The forward pass applies
u(k) ← Π(u(k) + α δu(k) + K(k)(X̂(k) − X(k))) with a backtracking line search on α, and
μ (Levenberg–Marquardt) grows when Q_uu + μI is not positive definite or no step
decreases C (Tassa, Mansard & Todorov 2014, "Control-limited DDP").

A batch of P initial states sharing one control sequence is one system with the
stacked state (X_1, …, X_P) (f_X block diagonal), so the feedback K reads all of them.

The backward pass is a strategy: `SequentialRiccati()` (the recursion above, a
`lax.scan`) or, for unconstrained Gauss–Newton iLQR, `ParallelRiccati()` (the same
V_X, V_XX, K, δu by an associative scan in O(log N) depth; see `_parallel_riccati`).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._base import (
    RUNNING,
    AbstractMethod,
    outcome,
    projected_gradient_norm,
    stop_test,
    target_of,
    unbounded,
)
from ._parallel import AbstractCostates, warn_costates
from ._parallel_riccati import AbstractRiccati, ParallelRiccati


_BOUNDED_PARALLEL = (
    "ILQR(backward=ParallelRiccati()) needs an unconstrained problem (lower = -inf, "
    "upper = +inf): the parallel LQ backward pass has no box QP; use SequentialRiccati() "
    "for problems with bounds"
)


def box_qp(h, g, lo, hi, iterations: int = 12):
    """min ½ xᵀHx + gᵀx s.t. lo ≤ x ≤ hi by projected Newton (H positive definite).

    Starts from Π(−H⁻¹g); each iteration takes a Newton step on the free controls
    (those not held at a bound by the gradient) with an Armijo backtracking search along
    the projection, and stops when the iterate no longer moves (at most `iterations`).
    With one control (m = 1) the minimiser is Π(−g/h) exactly, and no loop runs.

    **Returns:** `(x, free)`, with `free` the controls not clamped at the solution.
    """
    m = g.shape[0]
    eye = jnp.eye(m, dtype=g.dtype)
    q = lambda x: 0.5 * x @ h @ x + g @ x
    eps = 10 * jnp.finfo(g.dtype).eps

    def clamped(x):
        grad = h @ x + g
        return ((x <= lo) & (grad > 0)) | ((x >= hi) & (grad < 0))

    if m == 1:  # a scalar convex quadratic: its box minimiser is the clipped Newton point
        x = jnp.clip(-g / h[0], lo, hi)
        return x, ~clamped(x)

    def body(state):
        i, x, _ = state
        free = ~clamped(x)
        grad = h @ x + g
        hf = jnp.where(free[:, None] & free[None, :], h, eye)
        d = -jnp.linalg.solve(hf, jnp.where(free, grad, 0))
        qx = q(x)

        def trial(a):
            xn = jnp.clip(x + a * d, lo, hi)
            return xn, q(xn) <= qx + 1e-8 * (xn - x) @ grad

        def ls_body(ls):
            j, a, _, _ = ls
            xn, ok = trial(a / 2)
            return j + 1, a / 2, xn, ok

        xn, ok = trial(jnp.ones((), g.dtype))
        _, _, xn, ok = jax.lax.while_loop(
            lambda ls: ~ls[3] & (ls[0] < 20), ls_body, (0, jnp.ones((), g.dtype), xn, ok)
        )
        x_new = jnp.where(ok, xn, x)
        moved = jnp.max(jnp.abs(x_new - x)) > eps * (1 + jnp.max(jnp.abs(x)))
        return i + 1, x_new, moved

    x0 = jnp.clip(-jnp.linalg.solve(h, g), lo, hi)
    _, x, _ = jax.lax.while_loop(
        lambda state: state[2] & (state[0] < iterations), body, (0, x0, jnp.array(True))
    )
    return x, ~clamped(x)


# XLA:CPU runs every `dot` as its own library call; for the few-state blocks of one stage
# that call costs more than the arithmetic, and it cannot fuse with the adds around it.
# Up to this many multiply-adds a product is written as broadcast-multiply-and-sum, which
# XLA fuses with its neighbours into a single loop (16 states: 16³).
_FUSED_PRODUCT_SIZE = 4096


def _matmul(a, b):
    """a @ b for a 2-D `a` and a 1-D or 2-D `b`, fused when small (`_FUSED_PRODUCT_SIZE`)."""
    if a.size * (b.shape[1] if b.ndim == 2 else 1) > _FUSED_PRODUCT_SIZE:
        return a @ b
    if b.ndim == 1:
        return jnp.sum(a * b[None, :], axis=1)
    return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)


def _tmatmul(a, b):
    """aᵀ @ b, fused when small (see `_matmul`)."""
    return _matmul(a.T, b)


class SequentialRiccati(AbstractRiccati):
    """The backward pass of the module docstring as a `jax.lax.scan` over k = N−1..0: N
    sequential steps, each with the box QP (so it handles bounds) and, for DDP, the
    V_X'·f second-derivative terms. The default.

    For DDP `lin` carries, after the seven first-order blocks, the second derivatives of
    the dynamics (f_XX, f_uX, f_uu), computed for all stages at once before the scan, so
    that each step only contracts them with V_X'. The stage products of small systems
    are written so that XLA fuses them (`_matmul`): one loop per step instead of a
    library call per product."""

    def __call__(self, method, F, lin, Xs, u, ks, lower, upper, mu, VxN, VxxN):
        m = u.shape[-1]
        eye = jnp.eye(m, dtype=u.dtype)
        if method.second_order and len(lin) == 7:  # the dynamics' curvature, all stages
            lin = tuple(lin) + second_derivatives(F, Xs[:-1], u, ks)

        def contract(Vx, f2):  # Σ_i V_X,i f_i,jk: the DDP term V_X'·f_ab
            return jnp.sum(Vx[:, None, None] * f2, axis=0)

        def step(carry, inp):
            Vx, Vxx, ok, shift = carry
            blocks, uk, lo, hi = inp
            fx, fu, lx, lu, lxx, luu, lux = blocks[:7]
            Qx = lx + _tmatmul(fx, Vx)
            Qu = lu + _tmatmul(fu, Vx)
            VxxFx, VxxFu = _matmul(Vxx, fx), _matmul(Vxx, fu)
            Qxx = lxx + _tmatmul(fx, VxxFx)
            Quu = luu + _tmatmul(fu, VxxFu)
            Qux = lux + _tmatmul(fu, VxxFx)
            if method.second_order:
                fxx, fux, fuu = blocks[7:]
                Qxx = Qxx + contract(Vx, fxx)
                Qux = Qux + contract(Vx, fux)
                Quu = Quu + contract(Vx, fuu)
            Quu = 0.5 * (Quu + Quu.T)
            Quu_r = Quu + mu * eye
            if m == 1:
                pd = Quu_r[0, 0] > 0
                lowest = Quu[0, 0]
            else:
                pd = jnp.all(jnp.isfinite(jnp.linalg.cholesky(Quu_r)))
                # Gershgorin: no eigenvalue of Q_uu lies below this
                radius = jnp.sum(jnp.abs(Quu), axis=1) - jnp.abs(jnp.diagonal(Quu))
                lowest = jnp.min(jnp.diagonal(Quu) - radius)
            shift = jnp.where(ok & ~pd, -lowest, shift)  # at the first stage that fails
            Quu_safe = jnp.where(pd, Quu_r, eye)
            du, free = box_qp(Quu_safe, Qu, lo - uk, hi - uk, method.qp_iterations)
            if m == 1:
                K = -jnp.where(free[:, None], Qux, 0) / Quu_safe[0, 0]
            else:
                hf = jnp.where(free[:, None] & free[None, :], Quu_safe, eye)
                K = -jnp.linalg.solve(hf, jnp.where(free[:, None], Qux, 0))
            QuuDu = _matmul(Quu, du)
            Vx_new = Qx + _tmatmul(K, QuuDu + Qu) + _tmatmul(Qux, du)
            KtQux = _tmatmul(K, Qux)
            Vxx_new = Qxx + _tmatmul(K, _matmul(Quu, K)) + KtQux + KtQux.T
            Vxx_new = 0.5 * (Vxx_new + Vxx_new.T)
            dV = jnp.stack([jnp.sum(du * Qu), 0.5 * jnp.sum(du * QuuDu)])
            return (Vx_new, Vxx_new, ok & pd, shift), (du, K, dV, Vx_new, Vxx_new)

        inputs = (tuple(lin), u, lower, upper)
        start = (VxN, VxxN, jnp.array(True), jnp.zeros((), u.dtype))
        (_, _, ok, shift), (du, K, dV, Vx, Vxx) = jax.lax.scan(step, start, inputs, reverse=True)
        Vx = jnp.concatenate([Vx, VxN[None]])
        Vxx = jnp.concatenate([Vxx, VxxN[None]])
        return du, K, jnp.sum(dV, axis=0), ok, Vx, Vxx, shift


def second_derivatives(F, X, u, ks):
    """f_XX (N, n, n, n), f_uX (N, n, m, n), f_uu (N, n, m, m) at every stage, one
    vectorised `jax.hessian` (the DDP terms V_X'·f_XX, … contract them in the scan)."""

    def one(Xk, uk, k):
        (fxx, _), (fux, fuu) = jax.hessian(F, argnums=(0, 1))(Xk, uk, k)
        return fxx, fux, fuu

    return jax.vmap(one)(X, u, ks)


class ILQR(AbstractMethod):
    """iLQR (Gauss–Newton) or DDP (`second_order=True`) with box-constrained controls.

    **Arguments:**

    - `max_steps`: backward/forward passes (default 200).
    - `tol`: relative stopping tolerance: ‖u − Π(u − ∇C)‖∞ ≤ tol · (its value at
      u_init), with an absolute floor eps^(3/4) (`gradient_tolerance`); ∇C from
      `costates` (the core's recursion by default). None: 1e-8 in float64, 1e-4 in
      float32.
    - `second_order`: add the V_X·f second-derivative terms (DDP).
    - `mu_init`, `mu_min`, `mu_max`, `mu_factor`: Levenberg–Marquardt regularisation of
      Q_uu, updated as in Tassa, Erez & Todorov (2012): μ ← μδ with δ ← max(f, δf) after
      a failed step and δ ← min(1/f, δ/f) after an accepted one (μ = 0 below `mu_min`);
      when Q_uu + μI is not positive definite, μ also goes at once to twice the
      negative curvature of Q_uu (a Gershgorin bound) at the first stage that failed.
    - `max_backtracks`: line-search halvings of α from 1.
    - `qp_iterations`: projected-Newton iterations of the box QP at each stage.
    - `costates`: deprecated (the stopping test's gradient is the costate recursion
      λ(k) = ℓ_X + f_Xᵀλ(k+1), dC/du(k) = ℓ_u + f_uᵀλ(k+1) on the Jacobians the
      backward pass needs anyway, with no extra rollout; how the problem's own
      gradient is computed is `ControlProblem(adjoint=...)`).
    - `cost_target`: stop once C ≤ it (an array changes it without recompiling).
    - `backward`: the backward pass: `SequentialRiccati()` (default; a `lax.scan`, handles
      bounds and DDP) or `ParallelRiccati()` (an associative scan in O(log N) depth, for
      unconstrained Gauss–Newton iLQR only: a problem with a finite bound raises a
      ValueError (an `EquinoxRuntimeError` inside `solve`'s `jit`), and
      `second_order=True` raises a ValueError here).
    """

    max_steps: int = 200
    tol: float | None = None
    second_order: bool = False
    mu_init: float = 0.0
    mu_min: float = 1e-8
    mu_max: float = 1e10
    mu_factor: float = 2.0
    max_backtracks: int = 12
    qp_iterations: int = 12
    costates: AbstractCostates | None = None
    cost_target: float | jax.Array | None = None
    backward: AbstractRiccati = SequentialRiccati()

    def __check_init__(self):
        warn_costates(self)
        if not isinstance(self.backward, AbstractRiccati):
            raise TypeError(
                "ILQR: backward must be SequentialRiccati() or ParallelRiccati(), got "
                f"{type(self.backward).__name__}"
            )
        if self.second_order and isinstance(self.backward, ParallelRiccati):
            raise ValueError(
                "ILQR: backward=ParallelRiccati() supports Gauss–Newton iLQR only "
                "(second_order=False): the DDP terms V_X·f_XX are not an LQ element"
            )

    def check_problem(self, problem) -> None:
        """Raise a ValueError if `problem` has a finite bound and the backward pass is
        `ParallelRiccati()` (the parallel LQ form has no box QP). Inside `jit`, where the
        bounds are traced, the same check runs as `eqx.error_if` in `run`."""
        if not isinstance(self.backward, ParallelRiccati):
            return
        lo, hi = problem.lower, problem.upper
        if isinstance(lo, jax.core.Tracer) or isinstance(hi, jax.core.Tracer):
            return
        if bool(np.isfinite(np.asarray(lo)).any() or np.isfinite(np.asarray(hi)).any()):
            raise ValueError(_BOUNDED_PARALLEL)

    def run(self, problem, u0, gtol):
        self.check_problem(problem)
        if isinstance(self.backward, ParallelRiccati):
            finite = jnp.isfinite(problem.lower).any() | jnp.isfinite(problem.upper).any()
            u0 = eqx.error_if(u0, finite, _BOUNDED_PARALLEL)
        N = problem.horizon
        dtype = u0.dtype
        ks = jnp.arange(N, dtype=jnp.int32)
        X0 = problem.x0.reshape(-1)
        F, L, Phi = problem.stacked()

        def rollout(u):
            def step(X, inp):
                uk, k = inp
                return F(X, uk, k), (X, L(X, uk, k))

            XN, (Xs, ls) = jax.lax.scan(step, X0, (u, ks))
            return jnp.concatenate([Xs, XN[None]]), jnp.sum(ls) + Phi(XN)

        def linearise(Xs, u):
            """The LQ data of the backward pass at (Xs, u), and dC/du from them by the
            costate recursion λ(N) = φ_X, λ(k) = ℓ_X + f_Xᵀλ(k+1), dC/du(k) = ℓ_u + f_uᵀλ(k+1)."""

            def stage(X, uk, k):
                fx, fu = jax.jacfwd(F, argnums=(0, 1))(X, uk, k)
                lx, lu = jax.grad(L, argnums=(0, 1))(X, uk, k)
                (lxx, _), (lux, luu) = jax.hessian(L, argnums=(0, 1))(X, uk, k)
                return fx, fu, lx, lu, lxx, luu, lux

            lin = jax.vmap(stage)(Xs[:-1], u, ks)
            if self.second_order:
                lin = lin + second_derivatives(F, Xs[:-1], u, ks)
            VxN, VxxN = jax.grad(Phi)(Xs[-1]), jax.hessian(Phi)(Xs[-1])

            def costate_step(lam, blocks):
                fx, fu, lx, lu = blocks
                return lx + fx.T @ lam, lu + fu.T @ lam

            _, g = jax.lax.scan(costate_step, VxN, lin[:4], reverse=True)
            return (lin, VxN, VxxN), g

        def forward(Xs, u, du, K, alpha):
            def step(Xh, inp):
                X, uk, duk, Kk, k, lo, hi = inp
                un = jnp.clip(uk + alpha * duk + Kk @ (Xh - X), lo, hi)
                return F(Xh, un, k), (Xh, un, L(Xh, un, k))

            inputs = (Xs[:-1], u, du, K, ks, problem.lower, problem.upper)
            XN, (Xn, un, ls) = jax.lax.scan(step, X0, inputs)
            return jnp.concatenate([Xn, XN[None]]), un, jnp.sum(ls) + Phi(XN)

        def gradient(Xs, u, data, g):
            if self.costates is None:
                return g
            return self.costates.value_and_grad(problem, u)[1]

        Xs0, c0 = rollout(u0)
        data0, g0 = linearise(Xs0, u0)
        g0 = gradient(Xs0, u0, data0, g0)
        history = jnp.full(self.max_steps + 1, jnp.nan, dtype).at[0].set(c0)
        pg0 = projected_gradient_norm(problem, u0, g0)
        finite0 = jnp.isfinite(c0) & jnp.all(jnp.isfinite(g0))
        target = target_of(self)
        status = outcome(finite0, stop_test(pg0, gtol), c0 <= target, self.max_steps <= 0)
        mu0 = jnp.asarray(self.mu_init, dtype)
        delta0 = jnp.ones((), dtype)
        carry = (jnp.array(0), u0, Xs0, c0, data0, g0, mu0, delta0, history, status)
        rounding = 16 * jnp.finfo(dtype).eps

        def body(carry):
            i, u, Xs, c, data, g, mu, delta, history, _ = carry
            lin, VxN, VxxN = data
            bounds = (problem.lower, problem.upper)
            du, K, dV, pd, _, _, shift = self.backward(
                self, F, lin, Xs, u, ks, *bounds, mu, VxN, VxxN
            )

            def ls_cond(state):
                j, *_, accepted = state
                return ~accepted & (j < self.max_backtracks) & pd

            def ls_body(state):
                j, *_ = state
                alpha = jnp.asarray(0.5, dtype) ** j
                Xn, un, cn = forward(Xs, u, du, K, alpha)
                expected = -(alpha * dV[0] + alpha**2 * dV[1])
                decrease = cn <= c - 1e-4 * jnp.maximum(expected, 0)
                # next to the optimum the change of C is below its rounding: take the
                # full (Newton) step, which still shrinks the gradient, rather than
                # halving α and cycling μ until the budget runs out
                scale = rounding * (1 + jnp.abs(c))
                flat = (j == 0) & (jnp.abs(cn - c) <= scale) & (expected <= scale)
                return j + 1, Xn, un, cn, jnp.isfinite(cn) & (decrease | flat)

            _, Xn, un, cn, accepted = jax.lax.while_loop(
                ls_cond, ls_body, (jnp.array(0), Xs, u, c, jnp.array(False))
            )
            # Levenberg–Marquardt schedule of Tassa, Erez & Todorov (2012): the factor δ
            # itself grows (shrinks) geometrically while steps keep failing (succeeding)
            f = jnp.asarray(self.mu_factor, dtype)
            delta = jnp.where(accepted, jnp.minimum(1 / f, delta / f), jnp.maximum(f, delta * f))
            mu_up = jnp.maximum(mu * delta, self.mu_min)
            # Q_uu + μI failed at a stage with negative curvature −shift (DDP's V_X'·f
            # terms): go past it at once rather than double δ from μ_min up to it
            jump = jnp.where(jnp.isfinite(shift), 2 * shift, 0.0)  # (a NaN Q_uu: no jump)
            mu_up = jnp.where(pd, mu_up, jnp.maximum(mu_up, jump))
            mu_down = jnp.where(mu * delta < self.mu_min, 0.0, mu * delta)
            mu = jnp.where(accepted, mu_down, mu_up).astype(dtype)

            def relinearise(_):
                new_data, g_new = linearise(Xn, un)
                return Xn, un, cn, new_data, gradient(Xn, un, new_data, g_new)

            def keep(_):
                return Xs, u, c, data, g

            Xs, u, c, data, g = jax.lax.cond(accepted, relinearise, keep, None)
            finite = jnp.isfinite(c) & jnp.all(jnp.isfinite(g))
            i = i + 1
            done = stop_test(projected_gradient_norm(problem, u, g), gtol)
            status = outcome(
                finite,
                done,
                c <= target,
                i >= self.max_steps,
                mu > self.mu_max,
                unbounded(c, c0),
            )
            history = history.at[i].set(c)
            return i, u, Xs, c, data, g, mu, delta, history, status

        i, u, *_, history, status = jax.lax.while_loop(
            lambda carry: carry[-1] == RUNNING, body, carry
        )
        return u, history, i, status
