"""Results checked against references computed outside the code under test.

Continuous time (`costate_ode`, `trajectory_cost`, `diffrax_gradient`,
`compare_costate_gradients`):

- a linear ODE dX/dt = A X with quadratic costs and a running cost that depends on the
  parameters, whose C, dC/dA, dC/dq and dC/dx0 are closed forms in matrix exponentials
  (`scipy.linalg.expm`, `expm_frechet`, Van Loan's block matrix for ∫ e^{Aᵀt} M e^{At} dt);
- a nonlinear ODE against a fixed-step RK4 written in NumPy with its own discrete adjoint
  (checked by finite differences): discretise-then-optimise through diffrax with the same
  RK4 tableau equals it to rounding, and the costate ODE equals the converged gradient.

Box-constrained control (`control.solve`): the bounded LQR against the exact solution of
its QP (active set from `scipy.optimize.minimize(method="L-BFGS-B")`, certified by the
KKT conditions of the convex QP), and the pendulum swing-up with bounds against
L-BFGS-B on a plain rollout written here, polished by projected Newton steps.
"""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from scipy.linalg import expm, expm_frechet
from scipy.optimize import minimize

import adjoint as adj
from adjoint import control, problems

from .helpers import tree_max_rel_error


def _rel(a, b) -> float:
    """max |a − b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# ======================================================================== linear ODE
#   dX/dt = A X,  C = X(T)ᵀ P X(T) + ∫ ℓ dt,  ℓ = q XᵀQ₀X + 0.1 |A X|²  (depends on A, q)

T_LIN = 1.2
A_LIN = np.array([[-0.3, 1.0, 0.2], [-0.8, -0.1, 0.4], [0.1, -0.5, -0.6]])
X0_LIN = np.array([1.0, -0.5, 0.3])
P_LIN = np.diag([2.0, 1.0, 0.5])
Q0_LIN = np.array([[1.0, 0.2, 0.0], [0.2, 0.5, 0.1], [0.0, 0.1, 0.8]])
q_LIN = 0.7


def _linear_field(t, x, p):
    return p["A"] @ x


def _linear_running(t, x, p):
    return p["q"] * x @ Q0_LIN @ x + 0.1 * jnp.sum((p["A"] @ x) ** 2)


def _linear_terminal(x):
    return x @ P_LIN @ x


def _van_loan(A, M):
    """expm of [[−Aᵀ, M], [0, A]] T = [[·, G], [0, e^{AT}]]: ∫₀ᵀ e^{Aᵀt} M e^{At} dt = e^{AT}ᵀ G."""
    n = len(A)
    Z = np.zeros((2 * n, 2 * n))
    Z[:n, :n], Z[:n, n:], Z[n:, n:] = -A.T, M, A
    return Z * T_LIN


def _linear_value(A, q, x0):
    n = len(A)
    F = expm(_van_loan(A, q * Q0_LIN + 0.1 * A.T @ A))
    E = expm(A * T_LIN)
    M = E.T @ P_LIN @ E + F[n:, n:].T @ F[:n, n:]
    return x0 @ M @ x0, M


def _linear_closed_form(A, q, x0):
    """C, dC/dA, dC/dq, dC/dx0, X(T) and B(T) = −∂Φ/∂X(T), in closed form."""
    n = len(A)
    C, M = _linear_value(A, q, x0)
    Z = _van_loan(A, q * Q0_LIN + 0.1 * A.T @ A)
    F = expm(Z)
    E = expm(A * T_LIN)
    dA = np.zeros_like(A)
    for i in range(n):
        for j in range(n):
            Eij = np.zeros_like(A)
            Eij[i, j] = 1.0
            # the Fréchet derivative of both exponentials in the direction A → A + Eij
            dZ = np.zeros_like(Z)
            dZ[:n, :n], dZ[:n, n:], dZ[n:, n:] = -Eij.T, 0.1 * (Eij.T @ A + A.T @ Eij), Eij
            _, dF = expm_frechet(Z, dZ * T_LIN)
            _, dE = expm_frechet(A * T_LIN, Eij * T_LIN)
            dM = dE.T @ P_LIN @ E + E.T @ P_LIN @ dE + dF[n:, n:].T @ F[:n, n:]
            dM += F[n:, n:].T @ dF[:n, n:]
            dA[i, j] = x0 @ dM @ x0
    Fq = expm(_van_loan(A, Q0_LIN))
    dq = x0 @ Fq[n:, n:].T @ Fq[:n, n:] @ x0  # ∫ XᵀQ₀X dt
    xT = E @ x0
    return C, dA, dq, 2 * M @ x0, xT, -2 * P_LIN @ xT


def test_closed_form_reference_against_finite_differences():
    """The reference itself: its dC/dA and dC/dq are the derivatives of its C (NumPy)."""
    C, dA, dq, dx0, _, _ = _linear_closed_form(A_LIN, q_LIN, X0_LIN)
    eps = 1e-6
    fd = np.zeros_like(A_LIN)
    for i in range(3):
        for j in range(3):
            E = np.zeros_like(A_LIN)
            E[i, j] = eps
            fd[i, j] = (
                _linear_value(A_LIN + E, q_LIN, X0_LIN)[0]
                - _linear_value(A_LIN - E, q_LIN, X0_LIN)[0]
            ) / (2 * eps)
    assert _rel(dA, fd) < 1e-8  # measured 4e-10 (finite differences' own error)
    fd_q = (
        _linear_value(A_LIN, q_LIN + eps, X0_LIN)[0] - _linear_value(A_LIN, q_LIN - eps, X0_LIN)[0]
    ) / (2 * eps)
    assert abs(dq - fd_q) < 1e-8 * abs(dq)
    v = np.array([0.3, -1.0, 0.5])
    fd_x = (
        _linear_value(A_LIN, q_LIN, X0_LIN + eps * v)[0]
        - _linear_value(A_LIN, q_LIN, X0_LIN - eps * v)[0]
    ) / (2 * eps)
    assert abs(dx0 @ v - fd_x) < 1e-8 * abs(fd_x)


def test_linear_ode_against_matrix_exponentials():
    """Tsit5 with 60 fixed steps: every figure within 1e-10 of the closed form (measured
    ≤ 1.4e-12 relative)."""
    C, dA, dq, dx0, xT, bT = _linear_closed_form(A_LIN, q_LIN, X0_LIN)
    params = {"A": jnp.asarray(A_LIN), "q": jnp.asarray(q_LIN)}
    x0 = jnp.asarray(X0_LIN)
    kw = dict(
        t0=0.0,
        t1=T_LIN,
        dt0=0.02,
        running_cost=_linear_running,
        terminal_cost=_linear_terminal,
    )
    tol = 1e-10

    sol = adj.costate_ode(_linear_field, params, x0, **kw)
    assert abs(float(sol.value) - C) < tol * C
    assert _rel(sol.grads["A"], dA) < tol
    assert abs(float(sol.grads["q"]) - dq) < tol * dq
    assert _rel(sol.initial_costate, -dx0) < tol  # B(t0) = −dC/dx0
    assert _rel(sol.final_state, xT) < tol
    assert _rel(sol.final_costate, bT) < tol  # B(t1) = −∂Φ/∂X(t1)
    assert int(sol.forward_steps) == int(sol.backward_steps) == 60

    grads, g_x0 = jax.grad(
        lambda p, x: adj.trajectory_cost(_linear_field, p, x, **kw), argnums=(0, 1)
    )(params, x0)
    assert _rel(grads["A"], dA) < tol and abs(float(grads["q"]) - dq) < tol * dq
    assert _rel(g_x0, dx0) < tol

    # it runs diffrax_gradient with RecursiveCheckpointAdjoint and BacksolveAdjoint
    report = adj.compare_costate_gradients(_linear_field, params, x0, **kw)
    assert abs(float(report.value) - C) < tol * C
    for grads in (report.costate_ode, report.recursive_checkpoint, report.backsolve):
        assert _rel(grads["A"], dA) < tol and abs(float(grads["q"]) - dq) < tol * dq
    # the reported differences are max |ours − theirs| / max |theirs| over all leaves
    for theirs, reported in (
        (report.recursive_checkpoint, report.rel_diff_recursive_checkpoint),
        (report.backsolve, report.rel_diff_backsolve),
    ):
        assert float(reported) < tol
        assert abs(float(reported) - tree_max_rel_error(report.costate_ode, theirs)) < 1e-15


# ======================================================================== nonlinear ODE
#   dX/dt = tanh(W X + b)(1 + 0.1 sin t),  ℓ = 0.1|X|² + 0.01|W|²,  Φ = |X − 0.5|²

T_NL = 1.5
_rng = np.random.default_rng(0)
W_NL = 0.8 * _rng.normal(size=(3, 3)) / np.sqrt(3)
B_NL = 0.1 * _rng.normal(size=3)
X0_NL = _rng.normal(size=3)


def _nl_field(t, x, p):
    return jnp.tanh(p["w"] @ x + p["b"]) * (1 + 0.1 * jnp.sin(t))


def _nl_running(t, x, p):
    return 0.1 * jnp.sum(x**2) + 0.01 * jnp.sum(p["w"] ** 2)


def _nl_terminal(x):
    return jnp.sum((x - 0.5) ** 2)


def numpy_rk4(W, b, x0, h, gradient=True):
    """C by classic RK4 with step h on the augmented state (X, c), dc/dt = ℓ, and its
    discrete adjoint written out stage by stage: (C, dC/dW, dC/db, dC/dx0)."""
    n_steps = int(round(T_NL / h))
    s = lambda t: 1 + 0.1 * np.sin(t)
    f = lambda t, y: np.tanh(W @ y + b) * s(t)
    ell = lambda y: 0.1 * y @ y + 0.01 * np.sum(W * W)

    def stages(i, x):  # the stage points y1..y4 of step i and the slopes k1..k4
        t = i * h
        k1 = f(t, x)
        y2 = x + h / 2 * k1
        k2 = f(t + h / 2, y2)
        y3 = x + h / 2 * k2
        k3 = f(t + h / 2, y3)
        y4 = x + h * k3
        return t, (x, y2, y3, y4), (k1, k2, k3, f(t + h, y4))

    xs, c, x = [x0], 0.0, x0
    for i in range(n_steps):
        _, ys, ks = stages(i, x)
        c += h / 6 * (ell(ys[0]) + 2 * ell(ys[1]) + 2 * ell(ys[2]) + ell(ys[3]))
        x = x + h / 6 * (ks[0] + 2 * ks[1] + 2 * ks[2] + ks[3])
        xs.append(x)
    C = c + np.sum((x - 0.5) ** 2)
    if not gradient:
        return C
    lam, dW, db = 2 * (x - 0.5), np.zeros_like(W), np.zeros_like(b)

    def vjp(t, y, g, g_c):  # (∂f/∂y)ᵀ g + g_c ∂ℓ/∂y, accumulating the parameters' parts
        nonlocal dW, db
        a = s(t) * (1 - np.tanh(W @ y + b) ** 2) * g
        dW += np.outer(a, y) + g_c * 0.02 * W
        db += a
        return W.T @ a + g_c * 0.2 * y

    w = h / 6
    for i in range(n_steps - 1, -1, -1):
        t, ys, _ = stages(i, xs[i])
        y4 = vjp(t + h, ys[3], w * lam, w)
        y3 = vjp(t + h / 2, ys[2], 2 * w * lam + h * y4, 2 * w)
        y2 = vjp(t + h / 2, ys[1], 2 * w * lam + h / 2 * y3, 2 * w)
        y1 = vjp(t, ys[0], w * lam + h / 2 * y2, w)
        lam = lam + y1 + y2 + y3 + y4
    return C, dW, db, lam


class RK4(diffrax.AbstractERK):
    """Classic fourth-order Runge–Kutta, the tableau `numpy_rk4` uses."""

    tableau = diffrax.ButcherTableau(
        c=np.array([0.5, 0.5, 1.0]),
        b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
        b_error=np.zeros(4),
        a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    )
    interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        return 4


def test_numpy_rk4_adjoint_against_finite_differences():
    C, dW, db, dx0 = numpy_rk4(W_NL, B_NL, X0_NL, 0.01)
    rng = np.random.default_rng(1)
    vW, vb, vx = rng.normal(size=(3, 3)), rng.normal(size=3), rng.normal(size=3)
    eps = 1e-6
    fd = (
        numpy_rk4(W_NL + eps * vW, B_NL + eps * vb, X0_NL + eps * vx, 0.01, False)
        - numpy_rk4(W_NL - eps * vW, B_NL - eps * vb, X0_NL - eps * vx, 0.01, False)
    ) / (2 * eps)
    an = np.sum(dW * vW) + db @ vb + dx0 @ vx
    assert abs(fd - an) < 1e-7 * abs(an)  # measured 1.3e-9


def test_nonlinear_ode_against_numpy_rk4():
    params = {"w": jnp.asarray(W_NL), "b": jnp.asarray(B_NL)}
    x0 = jnp.asarray(X0_NL)
    kw = dict(t0=0.0, t1=T_NL, running_cost=_nl_running, terminal_cost=_nl_terminal)

    # discretise-then-optimise through the same RK4 steps: equal to rounding (measured 1.5e-15)
    C, dW, db, _ = numpy_rk4(W_NL, B_NL, X0_NL, 0.01)
    g = adj.diffrax_gradient(
        _nl_field,
        params,
        x0,
        adjoint=diffrax.RecursiveCheckpointAdjoint(),
        solver=RK4(),
        dt0=0.01,
        **kw,
    )
    assert _rel(g["w"], dW) < 1e-12 and _rel(g["b"], db) < 1e-12

    # the costate ODE (Tsit5, 30 steps) against the converged gradient (RK4, h = 0.0025,
    # which differs from h = 0.01 by 1.3e-12): measured ≤ 7e-13 relative
    C, dW, db, dx0 = numpy_rk4(W_NL, B_NL, X0_NL, 0.0025)
    sol = adj.costate_ode(_nl_field, params, x0, dt0=0.05, **kw)
    assert abs(float(sol.value) - C) < 1e-10 * C
    assert _rel(sol.grads["w"], dW) < 1e-10 and _rel(sol.grads["b"], db) < 1e-10
    assert _rel(sol.initial_costate, -dx0) < 1e-10


# ======================================================================== bounded LQR

A = np.array([[1.0, 0.1], [0.0, 1.0]])
B = np.array([[0.0], [0.1]])
Q = np.diag([1.0, 0.5])
R = np.array([[0.5]])
PN = np.diag([3.0, 2.0])
N = 15
X0 = np.array([3.0, 1.0])
LO, HI = -1.0, 0.8  # as tests/test_control.py's _saturating_lqr


def _lqr_f(x, u, k):
    return A @ x + B @ u


def _lqr_ell(x, u, k):
    return x @ Q @ x + u @ R @ u


def _lqr_phi(x):
    return x @ PN @ x


def _lqr_qp():
    """C(u) = ½ uᵀHu + gᵀu + c₀ with X(k) = A^k x0 + Σ_{j<k} A^{k−1−j} B u(j)."""
    Sx = np.stack([np.linalg.matrix_power(A, k) for k in range(N + 1)])
    Su = np.zeros((N + 1, 2, N))
    for k in range(N + 1):
        for j in range(k):
            Su[k, :, j] = (np.linalg.matrix_power(A, k - 1 - j) @ B)[:, 0]
    W = [Q] * N + [PN]
    H = 2 * R[0, 0] * np.eye(N) + sum(2 * Su[k].T @ W[k] @ Su[k] for k in range(N + 1))
    g = sum(2 * Su[k].T @ W[k] @ Sx[k] @ X0 for k in range(N + 1))
    c0 = sum(X0 @ Sx[k].T @ W[k] @ Sx[k] @ X0 for k in range(N + 1))
    return H, g, c0


def _lqr_rollout(u):
    """States, cost and the paper's costates B(k) = −∂C/∂X(k), in NumPy."""
    xs, c = [X0], 0.0
    for k in range(N):
        c += xs[-1] @ Q @ xs[-1] + R[0, 0] * u[k] ** 2
        xs.append(A @ xs[-1] + B[:, 0] * u[k])
    c += xs[-1] @ PN @ xs[-1]
    lam = [2 * PN @ xs[-1]]
    for k in range(N - 1, -1, -1):
        lam.append(2 * Q @ xs[k] + A.T @ lam[-1])
    return np.stack(xs), c, -np.stack(lam[::-1])


def test_bounded_lqr_against_its_qp():
    H, g, c0 = _lqr_qp()
    u_rand = np.random.default_rng(0).uniform(LO, HI, N)
    qp = lambda u: 0.5 * u @ H @ u + g @ u + c0
    assert abs(qp(u_rand) - _lqr_rollout(u_rand)[1]) < 1e-12 * qp(u_rand)

    res = minimize(
        lambda u: (qp(u), H @ u + g),
        np.zeros(N),
        jac=True,
        method="L-BFGS-B",
        bounds=[(LO, HI)] * N,
        options=dict(ftol=1e-15, gtol=1e-12, maxiter=10_000),
    )
    assert res.success, res.message
    # exact solution on L-BFGS-B's active set, certified by the KKT conditions of the
    # convex QP (H positive definite): it is the global optimum
    lower, upper = res.x <= LO + 1e-9, res.x >= HI - 1e-9
    free = ~(lower | upper)
    u_ref = np.where(lower, LO, np.where(upper, HI, 0.0))
    u_ref[free] = np.linalg.solve(H[np.ix_(free, free)], -(g + H[:, ~free] @ u_ref[~free])[free])
    grad = H @ u_ref + g
    assert np.linalg.eigvalsh(H).min() > 0
    assert np.all((u_ref >= LO) & (u_ref <= HI)) and np.abs(grad[free]).max() < 1e-12
    assert np.all(grad[lower] > 1e-3) and np.all(grad[upper] < -1e-3) and lower.sum() >= 2
    assert np.abs(res.x - u_ref).max() < 1e-8  # L-BFGS-B alone: measured 5e-11
    xs_ref, c_ref, b_ref = _lqr_rollout(u_ref)

    problem = control.ControlProblem(
        _lqr_f, _lqr_ell, _lqr_phi, jnp.asarray(X0), N, LO, HI, control_size=1
    )
    sol = control.solve(problem)  # ILQR: measured ≤ 3e-15 for every figure below
    assert bool(sol.converged), sol.message
    assert np.abs(sol.controls[:, 0] - u_ref).max() < 1e-12
    assert abs(float(sol.cost) - c_ref) < 1e-13 * c_ref
    assert np.abs(sol.states - xs_ref).max() < 1e-12
    assert _rel(sol.costates, b_ref) < 1e-12
    # bound multipliers: μ = ∂C/∂u ≥ 0 at the lower bound, −∂C/∂u at the upper, 0 inside
    assert np.abs(sol.kkt.multipliers_lower[:, 0] - np.where(lower, grad, 0)).max() < 1e-10
    assert np.abs(sol.kkt.multipliers_upper[:, 0] - np.where(upper, -grad, 0)).max() < 1e-10

    sol = control.solve(problem, method=control.ProjectedGradient())
    assert bool(sol.converged), sol.message
    assert np.abs(sol.controls[:, 0] - u_ref).max() < 1e-6  # measured 7.5e-9
    assert abs(float(sol.cost) - c_ref) < 1e-12 * c_ref


# ======================================================================== pendulum


PEND = dict(horizon=50, duration=2.5, u_max=5.0)  # 37 of 50 controls at a bound


def _pendulum_cost(u, x0=None):
    """C of the swing-up of `problems.pendulum`, written from its docstring (symplectic
    Euler, X(0) = 0 unless given)."""
    dt = PEND["duration"] / PEND["horizon"]

    def step(carry, uk):
        th, om, c = carry
        c = c + dt * (0.1 * (th - jnp.pi) ** 2 + 0.01 * om**2 + 0.05 * uk**2)
        om = om + dt * (-9.81 * jnp.sin(th) - 0.1 * om + uk)
        return (th + dt * om, om, c), None

    zero = jnp.zeros((), u.dtype)
    x0 = (zero, zero) if x0 is None else (x0[0], x0[1])
    (th, om, c), _ = jax.lax.scan(step, (*x0, zero), u)
    return c + 50 * (th - jnp.pi) ** 2 + 5 * om**2


def _projected_newton(f, u, lo, hi, steps=50):
    """Projected Newton steps (Bertsekas) on lo ≤ u ≤ hi with the exact Hessian: Newton on
    the free controls, gradient steps on the ones held at a bound, Armijo backtracking."""
    value_grad = jax.jit(jax.value_and_grad(f))
    hessian = jax.jit(jax.hessian(f))
    for _ in range(steps):
        v, g = (np.asarray(a) for a in value_grad(jnp.asarray(u)))
        pg = np.abs(u - np.clip(u - g, lo, hi)).max()
        if pg < 1e-13:
            break
        eps = min(1e-3, pg)
        held = ((u <= lo + eps) & (g > 0)) | ((u >= hi - eps) & (g < 0))
        H = np.asarray(hessian(jnp.asarray(u)))
        d = -g.copy()
        d[~held] = -np.linalg.solve(H[np.ix_(~held, ~held)], g[~held])
        alpha = 1.0
        while alpha > 1e-12:
            trial = np.clip(u + alpha * d, lo, hi)
            if float(value_grad(jnp.asarray(trial))[0]) <= v + 1e-4 * g @ (trial - u):
                break
            alpha /= 2
        u = trial
    v, g = (np.asarray(a) for a in value_grad(jnp.asarray(u)))
    held = ((u == lo) & (g > 0)) | ((u == hi) & (g < 0))
    return u, float(v), g, np.asarray(hessian(jnp.asarray(u))), held


def test_bounded_pendulum_against_lbfgsb():
    problem = problems.pendulum(**PEND, dtype=jnp.float64)
    n, umax = PEND["horizon"], PEND["u_max"]
    u_rand = jnp.asarray(np.random.default_rng(0).uniform(-umax, umax, (n, 1)))
    assert abs(float(problem.cost(u_rand)) - float(_pendulum_cost(u_rand[:, 0]))) < 1e-12 * float(
        problem.cost(u_rand)
    )

    value_grad = jax.jit(jax.value_and_grad(_pendulum_cost))
    res = minimize(
        lambda u: tuple(np.asarray(a, np.float64) for a in value_grad(jnp.asarray(u))),
        np.zeros(n),
        jac=True,
        method="L-BFGS-B",
        bounds=[(-umax, umax)] * n,
        options=dict(ftol=1e-15, gtol=1e-12, maxiter=5000),
    )
    u_ref, c_ref, grad, H, held = _projected_newton(_pendulum_cost, res.x, -umax, umax)
    # a strict local minimum: stationary on the free controls, strictly complementary
    # multipliers at the bounds, positive definite reduced Hessian
    free = ~held
    assert np.abs(grad[free]).max() < 1e-12 and held.sum() >= 30 and free.sum() >= 5
    assert np.abs(grad[held]).min() > 1e-4  # measured 8.9e-4
    assert np.linalg.eigvalsh(H[np.ix_(free, free)]).min() > 1e-3  # measured 3.3e-3
    assert np.abs(res.x - u_ref).max() < 1e-4  # L-BFGS-B alone: measured 8e-6
    assert abs(res.fun - c_ref) < 1e-10 * c_ref

    sol = control.solve(problem)  # ILQR, default tolerance (stationarity ≤ 4.9e-8)
    assert bool(sol.converged), sol.message
    u = np.asarray(sol.controls[:, 0])
    assert abs(float(sol.cost) - c_ref) < 1e-12 * c_ref  # measured 4e-14
    assert np.all((np.abs(u) == umax) == held)  # the same controls at the bounds, exactly
    # off by at most stationarity / smallest curvature = 4.9e-8 / 3.3e-3: measured 7.5e-6
    assert np.abs(u - u_ref).max() < 1e-4

    sol = control.solve(problem, method=control.ILQR(tol=1e-12))
    assert bool(sol.converged), sol.message
    assert np.abs(sol.controls[:, 0] - u_ref).max() < 1e-8  # measured 6e-10
    mu = np.asarray(sol.kkt.multipliers_lower[:, 0] - sol.kkt.multipliers_upper[:, 0])
    assert np.abs(mu - np.where(held, grad, 0)).max() < 1e-10  # measured 3.7e-12
    # B(0) = −dC/dX(0) of the plain rollout
    b0 = -jax.grad(lambda x0: _pendulum_cost(sol.controls[:, 0], x0))(jnp.zeros(2))
    assert _rel(sol.costates[0], b0) < 1e-12
