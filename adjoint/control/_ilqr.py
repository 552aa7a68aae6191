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
from ._parallel import AbstractCostates, SequentialCostates
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

    **Returns:** `(x, free)`, with `free` the controls not clamped at the solution.
    """
    m = g.shape[0]
    eye = jnp.eye(m, dtype=g.dtype)
    q = lambda x: 0.5 * x @ h @ x + g @ x
    eps = 10 * jnp.finfo(g.dtype).eps

    def clamped(x):
        grad = h @ x + g
        return ((x <= lo) & (grad > 0)) | ((x >= hi) & (grad < 0))

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


class SequentialRiccati(AbstractRiccati):
    """The backward pass of the module docstring as a `jax.lax.scan` over k = N−1..0: N
    sequential steps, each with the box QP (so it handles bounds) and, for DDP, the
    V_X'·f second-derivative terms. The default."""

    def __call__(self, method, F, lin, Xs, u, ks, lower, upper, mu, VxN, VxxN):
        m = u.shape[-1]
        eye = jnp.eye(m, dtype=u.dtype)

        def step(carry, inp):
            Vx, Vxx, ok = carry
            (fx, fu, lx, lu, lxx, luu, lux), X, uk, k, lo, hi = inp
            Qx = lx + fx.T @ Vx
            Qu = lu + fu.T @ Vx
            Qxx = lxx + fx.T @ Vxx @ fx
            Quu = luu + fu.T @ Vxx @ fu
            Qux = lux + fu.T @ Vxx @ fx
            if method.second_order:
                (hxx, hxu), (hux, huu) = jax.hessian(
                    lambda X_, u_: Vx @ F(X_, u_, k), argnums=(0, 1)
                )(X, uk)
                Qxx, Quu, Qux = Qxx + hxx, Quu + huu, Qux + hux
            Quu = 0.5 * (Quu + Quu.T)
            Quu_r = Quu + mu * eye
            chol = jnp.linalg.cholesky(Quu_r)
            pd = jnp.all(jnp.isfinite(chol))
            Quu_safe = jnp.where(pd, Quu_r, eye)
            du, free = box_qp(Quu_safe, Qu, lo - uk, hi - uk, method.qp_iterations)
            hf = jnp.where(free[:, None] & free[None, :], Quu_safe, eye)
            K = -jnp.linalg.solve(hf, jnp.where(free[:, None], Qux, 0))
            Vx_new = Qx + K.T @ Quu @ du + K.T @ Qu + Qux.T @ du
            Vxx_new = Qxx + K.T @ Quu @ K + K.T @ Qux + Qux.T @ K
            Vxx_new = 0.5 * (Vxx_new + Vxx_new.T)
            dV = jnp.stack([du @ Qu, 0.5 * du @ Quu @ du])
            return (Vx_new, Vxx_new, ok & pd), (du, K, dV, Vx_new, Vxx_new)

        inputs = (lin, Xs[:-1], u, ks, lower, upper)
        (_, _, ok), (du, K, dV, Vx, Vxx) = jax.lax.scan(
            step, (VxN, VxxN, jnp.array(True)), inputs, reverse=True
        )
        Vx = jnp.concatenate([Vx, VxN[None]])
        Vxx = jnp.concatenate([Vxx, VxxN[None]])
        return du, K, jnp.sum(dV, axis=0), ok, Vx, Vxx


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
      Q_uu.
    - `max_backtracks`: line-search halvings of α from 1.
    - `qp_iterations`: projected-Newton iterations of the box QP at each stage.
    - `costates`: how the stopping test's gradient is computed.
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
    mu_factor: float = 10.0
    max_backtracks: int = 12
    qp_iterations: int = 12
    costates: AbstractCostates = SequentialCostates()
    cost_target: float | jax.Array | None = None
    backward: AbstractRiccati = SequentialRiccati()

    def __check_init__(self):
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

        def linearise(X, u, k):
            fx, fu = jax.jacfwd(F, argnums=(0, 1))(X, u, k)
            lx, lu = jax.grad(L, argnums=(0, 1))(X, u, k)
            (lxx, lxu), (lux, luu) = jax.hessian(L, argnums=(0, 1))(X, u, k)
            return fx, fu, lx, lu, lxx, luu, lux

        def backward(Xs, u, mu):
            lin = jax.vmap(linearise)(Xs[:-1], u, ks)
            VxN = jax.grad(Phi)(Xs[-1])
            VxxN = jax.hessian(Phi)(Xs[-1])
            bounds = (problem.lower, problem.upper)
            du, K, dV, ok, _, _ = self.backward(self, F, lin, Xs, u, ks, *bounds, mu, VxN, VxxN)
            return du, K, dV, ok

        def forward(Xs, u, du, K, alpha):
            def step(Xh, inp):
                X, uk, duk, Kk, k, lo, hi = inp
                un = jnp.clip(uk + alpha * duk + Kk @ (Xh - X), lo, hi)
                return F(Xh, un, k), (un, L(Xh, un, k))

            inputs = (Xs[:-1], u, du, K, ks, problem.lower, problem.upper)
            XN, (un, ls) = jax.lax.scan(step, X0, inputs)
            return un, jnp.sum(ls) + Phi(XN)

        vg = lambda u: self.costates.value_and_grad(problem, u)
        c0, g0 = vg(u0)
        Xs0, _ = rollout(u0)
        history = jnp.full(self.max_steps + 1, jnp.nan, dtype).at[0].set(c0)
        pg0 = projected_gradient_norm(problem, u0, g0)
        finite0 = jnp.isfinite(c0) & jnp.all(jnp.isfinite(g0))
        target = target_of(self)
        status = outcome(finite0, stop_test(pg0, gtol), c0 <= target, self.max_steps <= 0)
        mu0 = jnp.asarray(self.mu_init, dtype)
        carry = (jnp.array(0), u0, Xs0, c0, mu0, history, status)

        def body(carry):
            i, u, Xs, c, mu, history, _ = carry
            du, K, dV, pd = backward(Xs, u, mu)

            def ls_cond(state):
                j, _, _, accepted = state
                return ~accepted & (j < self.max_backtracks) & pd

            def ls_body(state):
                j, _, _, _ = state
                alpha = jnp.asarray(0.5, dtype) ** j
                un, cn = forward(Xs, u, du, K, alpha)
                expected = -(alpha * dV[0] + alpha**2 * dV[1])
                decrease = cn <= c - 1e-4 * jnp.maximum(expected, 0)
                # next to the optimum the change of C is below its rounding: take the
                # full (Newton) step, which still shrinks the gradient, rather than
                # halving α and cycling μ until the budget runs out
                rounding = 16 * jnp.finfo(dtype).eps * (1 + jnp.abs(c))
                flat = (j == 0) & (jnp.abs(cn - c) <= rounding) & (expected <= rounding)
                accepted = jnp.isfinite(cn) & (decrease | flat)
                return j + 1, un, cn, accepted

            _, un, cn, accepted = jax.lax.while_loop(
                ls_cond, ls_body, (jnp.array(0), u, c, jnp.array(False))
            )
            mu_up = jnp.maximum(mu * self.mu_factor, self.mu_min)
            mu_down = jnp.where(mu / self.mu_factor < self.mu_min, 0.0, mu / self.mu_factor)
            mu = jnp.where(accepted, mu_down, mu_up).astype(dtype)
            u = jnp.where(accepted, un, u)
            Xs_new, _ = rollout(u)
            c_new, g_new = vg(u)
            finite = jnp.isfinite(c_new) & jnp.all(jnp.isfinite(g_new))
            i = i + 1
            done = stop_test(projected_gradient_norm(problem, u, g_new), gtol)
            status = outcome(
                finite,
                done,
                c_new <= target,
                i >= self.max_steps,
                mu > self.mu_max,
                unbounded(c_new, c0),
            )
            history = history.at[i].set(c_new)
            return i, u, Xs_new, c_new, mu, history, status

        i, u, _, _, _, history, status = jax.lax.while_loop(
            lambda carry: carry[-1] == RUNNING, body, carry
        )
        return u, history, i, status
