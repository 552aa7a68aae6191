"""adjoint.control: the problem's gradient is the core recursion; solvers reach the
known optima (Riccati, bang-bang); KKT / Pontryagin checks; parallel costates; errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adjoint
from adjoint import control

from .helpers import finite_difference_grad, tree_max_rel_error


A = np.array([[1.0, 0.1], [0.0, 1.0]])
B = np.array([[0.0], [0.1]])
Q = np.diag([1.0, 0.5])
R = np.array([[0.5]])
PN = np.diag([3.0, 2.0])
N = 15


# module-level callables, so that jit caches are shared between tests
def _lqr_f(x, u, k):
    return A @ x + B @ u


def _lqr_ell(x, u, k):
    return x @ Q @ x + u @ R @ u


def _lqr_phi(x):
    return x @ PN @ x


def _lqr(x0, dtype=jnp.float64, **kwargs):
    return control.ControlProblem(
        _lqr_f,
        _lqr_ell,
        _lqr_phi,
        jnp.asarray(x0, dtype),
        N,
        control_size=1,
        **kwargs,
    )


def _riccati():
    """The reference, in NumPy: P(N) = PN, K = (R + BᵀP'B)⁻¹BᵀP'A, P = Q + AᵀP'(A − BK)."""
    Ps, Ks = [None] * (N + 1), [None] * N
    Ps[N] = PN
    for k in range(N - 1, -1, -1):
        Ks[k] = np.linalg.solve(R + B.T @ Ps[k + 1] @ B, B.T @ Ps[k + 1] @ A)
        Ps[k] = Q + A.T @ Ps[k + 1] @ (A - B @ Ks[k])
    return Ps, Ks


def _riccati_rollout(x0):
    Ps, Ks = _riccati()
    x, xs, us = np.asarray(x0, float), [np.asarray(x0, float)], []
    for k in range(N):
        u = -Ks[k] @ x
        x = A @ x + B @ u
        us.append(u)
        xs.append(x)
    costates = np.stack([-2 * Ps[k] @ xs[k] for k in range(N + 1)])
    return np.stack(us), np.stack(xs), costates


def _pend_f(x, u, k):
    w = x[1] + 0.1 * (-9.81 * jnp.sin(x[0]) - 0.1 * x[1] + u[0])
    return jnp.stack([x[0] + 0.1 * w, w])


def _pend_ell(x, u, k):
    return 0.1 * (0.1 * (x[0] - jnp.pi) ** 2 + 0.05 * u[0] ** 2) * (1 + 0.01 * k)


def _pend_phi(x):
    return 10 * (x[0] - jnp.pi) ** 2 + x[1] ** 2


def _pendulum(x0, horizon=8, bound=None):
    return control.ControlProblem(
        _pend_f,
        _pend_ell,
        _pend_phi,
        x0,
        horizon,
        None if bound is None else -bound,
        bound,
        control_size=1,
    )


# ---------------------------------------------------------------- the gradient is the core's


def test_problem_is_a_stacked_multistage():
    prob = _lqr([1.0, -0.5])
    system = prob.system(jnp.zeros((N, 1)))
    assert isinstance(system, adjoint.Multistage) and system.stacked
    assert isinstance(system.stages, control.ControlStage) and system.n_stages == N
    assert isinstance(system.adjoint, adjoint.CostateAdjoint)


@pytest.mark.standard_promotion
def test_gradient_matches_autodiff_and_finite_differences(getkey):
    x0 = jnp.array([[0.3, 0.0], [-0.2, 0.5]])
    prob = _pendulum(x0)
    u = 0.5 * jax.random.normal(getkey(), (8, 1))
    g = jax.grad(prob.cost)(u)
    ref = _pendulum(x0)
    ref = eqx.tree_at(lambda p: p.adjoint, ref, adjoint.AutodiffAdjoint())
    g_ad = jax.grad(ref.cost)(u)
    assert tree_max_rel_error(g, g_ad) < 1e-12
    g_fd = finite_difference_grad(eqx.filter_jit(prob.cost), u)
    assert tree_max_rel_error(g, g_fd) < 1e-7


@pytest.mark.standard_promotion
def test_costates_paper_sign(getkey):
    x0 = jnp.array([0.3, 0.1])
    prob = _pendulum(x0)
    u = jax.random.normal(getkey(), (8, 1))
    value, states, b, grad = prob.costates(u)
    assert value == pytest.approx(float(prob.cost(u)), rel=1e-12)
    # B(N) = −∂φ/∂X(N), B(0) = −dC/dX(0)
    assert np.allclose(b[-1, 0], -jax.grad(prob.terminal_cost)(states[-1, 0]), atol=1e-12)

    def cost_of_x0(x):
        return control.ControlProblem(
            prob.dynamics, prob.running_cost, prob.terminal_cost, x, 8, control_size=1
        ).cost(u)

    assert np.allclose(b[0, 0], -jax.grad(cost_of_x0)(x0), atol=1e-10)
    assert tree_max_rel_error(grad, jax.grad(prob.cost)(u)) < 1e-12


@pytest.mark.standard_promotion
def test_hamiltonian_is_the_core_one(getkey):
    prob = _pendulum(jnp.array([0.3, 0.1]))
    u = jax.random.normal(getkey(), (8, 1))
    _, states, b, _ = prob.costates(u)
    system = prob.system(u)
    z = system.trajectory(prob.initial_augmented())
    k = 3
    b_aug = jnp.concatenate([b[k + 1], -jnp.ones((1, 1))], axis=1)  # B_c = −1
    core = adjoint.hamiltonian(system, k + 1, z[k], b_aug)
    ours = prob.hamiltonian(jnp.int32(k), states[k], u[k], b[k + 1])
    # the core's H omits the constant accumulated cost's costate term B_c·c(k)
    assert float(ours) == pytest.approx(float(core + z[k][0, -1]), rel=1e-12)


@pytest.mark.standard_promotion
def test_parallel_costates_equal_sequential(getkey):
    x0 = jnp.array([[0.3, 0.0], [-0.2, 0.5], [1.0, -1.0]])
    prob = _pendulum(x0, horizon=37)
    u = jax.random.normal(getkey(), (37, 1))
    value, states, b, grad = eqx.filter_jit(lambda p, u: p.costates(u))(prob, u)
    p_value, p_states, p_b, p_grad = eqx.filter_jit(control.parallel_costates)(prob, u)
    assert float(p_value) == pytest.approx(float(value), rel=1e-13)
    assert tree_max_rel_error(p_states, states) < 1e-13
    assert tree_max_rel_error(p_b, b) < 1e-11
    assert tree_max_rel_error(p_grad, grad) < 1e-11
    # one knob: the problem's adjoint is the parallel scan for every method
    problem = eqx.tree_at(
        lambda p: p.adjoint, _pendulum(x0[0], horizon=37, bound=2.0), adjoint.ParallelCostates()
    )
    sol = control.solve(problem, jnp.zeros((37, 1)), control.ProjectedGradient())
    # converged = its stopping test AND the KKT check run on the core's costates
    assert bool(sol.converged), sol.message
    with pytest.warns(DeprecationWarning, match="ControlProblem\\(adjoint=...\\)"):
        control.ProjectedGradient(costates=control.ParallelCostates())  # the old knob


# ---------------------------------------------------------------- LQR against Riccati


# iLQR is exact after its one Newton step (errors measured ≤ 7e-15); the gradient
# methods stop at their tolerance (measured ≤ 1e-9 and 3e-9): each bound ~100× above
@pytest.mark.parametrize(
    "method, tol",
    [
        (control.ILQR(), 1e-12),
        (control.ProjectedGradient(), 1e-7),
        (control.GradientDescent(optax.sgd(0.1)), 3e-7),
    ],
    ids=["ilqr", "projected-gradient", "sgd"],
)
def test_lqr_equals_riccati(method, tol):
    x0 = np.array([1.0, -0.5])
    prob = _lqr(x0)
    sol = control.solve(prob, jnp.zeros((N, 1)), method)
    us, xs, costates = _riccati_rollout(x0)
    assert bool(sol.converged), sol.message
    assert np.max(np.abs(sol.controls - us)) < tol
    assert np.max(np.abs(sol.states - xs)) < tol
    assert np.max(np.abs(sol.costates - costates)) < tol  # B(k) = −2 P(k) X(k)
    assert bool(sol.kkt.ok)
    assert float(jnp.max(sol.kkt.stationarity)) <= float(sol.kkt.tolerance)
    h = sol.history
    assert h.shape == (int(sol.num_steps) + 1,) and np.all(np.diff(np.asarray(h)) <= 1e-12)


def test_ilqr_lqr_one_newton_step():
    sol = control.solve(_lqr([1.0, -0.5]), jnp.zeros((N, 1)), control.ILQR())
    assert int(sol.num_steps) == 1


def test_lqr_batch_of_initial_states():
    """One open-loop control serving 3 initial states: C is quadratic in u, solved here
    by dense normal equations."""
    x0s = np.array([[1.0, -0.5], [-0.3, 0.2], [0.5, 1.0]])
    prob = _lqr(x0s)
    # X(k) = A^k x0 + Σ_{j<k} A^{k-1-j} B u(j)  →  stacked X = Sx x0 + Su u
    Sx = np.stack([np.linalg.matrix_power(A, k) for k in range(N + 1)])  # (N+1, n, n)
    Su = np.zeros((N + 1, 2, N))
    for k in range(N + 1):
        for j in range(k):
            Su[k, :, j] = (np.linalg.matrix_power(A, k - 1 - j) @ B)[:, 0]
    W = [Q] * N + [PN]
    H = 2 * R[0, 0] * np.eye(N) * len(x0s)
    rhs = np.zeros(N)
    for x0 in x0s:
        for k in range(N + 1):
            H += 2 * len(x0s) ** 0 * Su[k].T @ W[k] @ Su[k]
            rhs -= 2 * Su[k].T @ W[k] @ Sx[k] @ x0
    u_ref = np.linalg.solve(H, rhs)
    for method in (control.ILQR(), control.ProjectedGradient()):
        sol = control.solve(prob, jnp.zeros((N, 1)), method)
        assert bool(sol.converged), sol.message
        assert sol.states.shape == (N + 1, 3, 2) and sol.costates.shape == (N + 1, 3, 2)
        assert np.max(np.abs(sol.controls[:, 0] - u_ref)) < 1e-6


# standard promotion: the LQR dynamics multiply float64 NumPy matrices by the float32 state
# (the test's own functions, not the package)
@pytest.mark.standard_promotion
def test_float32_lqr():
    x0 = np.array([1.0, -0.5])
    prob = _lqr(x0, dtype=jnp.float32)
    sol = control.solve(prob, jnp.zeros((N, 1), jnp.float32), control.ILQR())
    assert sol.controls.dtype == jnp.float32 and sol.costates.dtype == jnp.float32
    us, _, costates = _riccati_rollout(x0)
    assert bool(sol.converged), sol.message
    assert np.max(np.abs(sol.controls - us)) < 1e-4
    assert np.max(np.abs(sol.costates - costates)) < 1e-4


def test_solve_under_vmap():
    method = control.ProjectedGradient()

    def from_x0(x0):
        return control.solve(_lqr(x0), jnp.zeros((N, 1)), method).controls

    x0s = jnp.array([[1.0, -0.5], [0.2, 0.3]])
    batched = jax.vmap(from_x0)(x0s)
    for i, x0 in enumerate(np.asarray(x0s)):
        assert np.max(np.abs(batched[i] - _riccati_rollout(x0)[0])) < 1e-6


# ---------------------------------------------------------------- bounds, KKT, Pontryagin


def _saturating_lqr():
    return _lqr([3.0, 1.0], lower=-1.0, upper=0.8)


@pytest.mark.parametrize(
    "method",
    [control.ILQR(), control.ProjectedGradient(), control.GradientDescent(optax.sgd(0.05))],
    ids=["ilqr", "projected-gradient", "sgd"],
)
def test_bounded_lqr_kkt(method):
    prob = _saturating_lqr()
    sol = control.solve(prob, jnp.zeros((N, 1)), method)
    assert bool(sol.converged), sol.message
    u = np.asarray(sol.controls)
    assert u.min() >= -1.0 and u.max() <= 0.8  # met exactly
    at_lower = u[:, 0] == -1.0
    assert at_lower.sum() >= 2  # the bound is active ...
    kkt = sol.kkt
    assert np.all(kkt.multipliers_lower >= 0) and np.all(kkt.multipliers_upper >= 0)
    assert np.all(np.asarray(kkt.multipliers_lower)[at_lower, 0] > 1e-3)  # ... and binding
    assert np.all(np.asarray(kkt.multipliers_lower)[~at_lower] == 0)
    assert float(kkt.complementarity) <= float(kkt.tolerance)
    assert float(kkt.primal_infeasibility) == 0.0
    assert np.all(np.asarray(kkt.pontryagin_gap) <= float(kkt.tolerance))


def test_all_methods_agree_on_bounded_problem():
    prob = _saturating_lqr()
    sols = [
        control.solve(prob, jnp.zeros((N, 1)), m)
        for m in (control.ILQR(), control.ProjectedGradient())
    ]
    assert abs(float(sols[0].cost) - float(sols[1].cost)) < 1e-9
    assert np.max(np.abs(sols[0].controls - sols[1].controls)) < 1e-6


def test_kkt_flags_a_non_optimal_control():
    prob = _saturating_lqr()
    sol = control.solve(prob, jnp.zeros((N, 1)), control.ILQR())
    analyse = eqx.filter_jit(control.analyse)
    _, _, _, kkt = analyse(prob, jnp.zeros((N, 1)), 1e-8)
    assert not bool(kkt.ok) and float(jnp.max(kkt.stationarity)) > 1e-2
    # move one saturated control off its bound: stationarity and Pontryagin both see it
    u = np.asarray(sol.controls).copy()
    k = int(np.argmax(u[:, 0] == -1.0))
    u[k, 0] = 0.0
    _, _, _, kkt = analyse(prob, jnp.asarray(u), 1e-8)
    assert float(kkt.stationarity[k]) > 1e-3
    assert float(kkt.pontryagin_gap[k]) > 1e-3
    assert not bool(kkt.pontryagin_ok)


def test_box_qp_against_enumeration(getkey):
    M = jax.random.normal(getkey(), (6, 2, 2))
    h = M @ jnp.swapaxes(M, 1, 2) + 0.1 * jnp.eye(2)
    g = 3 * jax.random.normal(getkey(), (6, 2))
    lo, hi = jnp.array([-0.5, -1.0]), jnp.array([0.7, 0.2])
    xs, free = jax.jit(jax.vmap(control.box_qp, (0, 0, None, None)))(h, g, lo, hi)
    grid = jnp.stack(
        jnp.meshgrid(jnp.linspace(-0.5, 0.7, 401), jnp.linspace(-1.0, 0.2, 401)), -1
    ).reshape(-1, 2)
    q = lambda h, g, y: 0.5 * y @ h @ y + g @ y
    best = jax.vmap(lambda h, g: jnp.min(jax.vmap(lambda y: q(h, g, y))(grid)))(h, g)
    assert np.all(jax.vmap(q)(h, g, xs) <= best + 1e-10)
    assert np.all((xs >= lo) & (xs <= hi))
    assert np.all(free | (xs == lo) | (xs == hi))
    assert not np.all(free)  # some cases are clamped


# ---------------------------------------------------------------- bad input


def test_bad_inputs():
    f = lambda x, u, k: x + u
    ell = lambda x, u, k: jnp.sum(u**2)
    phi = lambda x: jnp.sum(x**2)
    x0 = jnp.ones(2)
    with pytest.raises(ValueError, match="lower > upper"):
        control.ControlProblem(f, ell, phi, x0, 4, lower=[0.0, 1.0], upper=[1.0, 0.5])
    with pytest.raises(ValueError, match="dynamics must return a state of shape"):
        control.ControlProblem(lambda x, u, k: x[:1], ell, phi, x0, 4, control_size=2)
    with pytest.raises(ValueError, match="running_cost must return a scalar"):
        control.ControlProblem(f, lambda x, u, k: u**2, phi, x0, 4, control_size=2)
    with pytest.raises(ValueError, match="terminal_cost must return a scalar"):
        control.ControlProblem(f, ell, lambda x: x, x0, 4, control_size=2)
    with pytest.raises(ValueError, match="dynamics failed"):
        control.ControlProblem(f, ell, phi, x0, 4, control_size=3)
    with pytest.raises(ValueError, match="horizon"):
        control.ControlProblem(f, ell, phi, x0, 0, control_size=2)
    with pytest.raises(ValueError, match="upper must be"):
        control.ControlProblem(f, ell, phi, x0, 4, upper=jnp.ones((3, 2)))
    prob = control.ControlProblem(f, ell, phi, x0, 4, lower=-1.0, upper=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"shape \(horizon, m\) = \(4, 2\)"):
        control.solve(prob, jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="outside the bounds at u\\(2\\)\\[1\\]"):
        control.solve(prob, jnp.zeros((4, 2)).at[2, 1].set(2.5))
    with pytest.raises(TypeError, match="method must be"):
        control.solve(prob, jnp.zeros((4, 2)), optax.sgd(0.1))
    # inside jit the bound check is an eqx.error_if
    with pytest.raises(Exception, match="outside the bounds"):
        eqx.filter_jit(lambda u: control.solve(prob, u, control.ProjectedGradient()))(
            jnp.zeros((4, 2)).at[0, 0].set(-3.0)
        )


@pytest.mark.parametrize(
    "method", [control.ILQR(), control.ProjectedGradient()], ids=["ilqr", "pg"]
)
def test_nan_in_rollout_is_flagged(method):
    # sqrt of a negative state: the rollout becomes NaN
    prob = control.ControlProblem(
        lambda x, u, k: jnp.sqrt(x) + u,
        lambda x, u, k: jnp.sum(u**2),
        lambda x: jnp.sum(x**2),
        jnp.array([-1.0]),
        3,
        control_size=1,
    )
    sol = control.solve(prob, jnp.zeros((3, 1)), method, throw=False)
    assert sol.result == adjoint.RESULTS.nonfinite
    assert not bool(sol.converged)
    assert "non-finite" in sol.message


def test_cost_target_stops_early():
    prob = _lqr([1.0, -0.5])
    full = control.solve(prob, jnp.zeros((N, 1)), control.ProjectedGradient())
    target = 1.01 * float(full.cost)
    sol = control.solve(
        prob,
        jnp.zeros((N, 1)),
        control.ProjectedGradient(cost_target=jnp.asarray(target)),
        throw=False,
    )
    assert sol.result == adjoint.RESULTS.target_reached and "cost_target" in sol.message
    assert float(sol.cost) <= target and int(sol.num_steps) < int(full.num_steps)
    assert not bool(sol.converged)  # reaching a cost is not optimality


def _double_well(x, u, k):
    return jnp.sum(u**4 - u**2 + 0.1 * u) + 0 * jnp.sum(x)


def test_pontryagin_check_sees_a_local_minimum():
    """ℓ(u) = u⁴ − u² + 0.1u has a local minimum near u = +0.68 and the global one near
    −0.73; started at u = 1, small steepest-descent steps stop at the local one: KKT
    holds, the minimum principle does not."""
    prob = control.ControlProblem(
        lambda x, u, k: x, _double_well, lambda x: jnp.sum(x**2), jnp.zeros(1), 4, control_size=1
    )
    method = control.GradientDescent(optax.sgd(0.05))
    sol = control.solve(prob, jnp.ones((4, 1)), method, throw=False)
    assert np.allclose(sol.controls, 0.68064, atol=1e-4)
    assert bool(sol.kkt.kkt_ok) and not bool(sol.kkt.pontryagin_ok)
    assert not bool(sol.converged)
    assert float(jnp.min(sol.kkt.pontryagin_gap)) > 0.1
    relaxed = control.solve(prob, jnp.ones((4, 1)), method, pontryagin=False)
    assert bool(relaxed.converged)
    assert bool(control.solve(prob, -jnp.ones((4, 1)), method).converged)  # the global one


def _near_pendulum(a, b, c, r, x0):
    dt = 0.05

    def f(x, u, k):
        w = x[1] + dt * (-a * jnp.sin(x[0]) - b * x[1] + c * u[0])
        return jnp.stack([x[0] + dt * w, w])

    def ell(x, u, k):
        return dt * ((x[0] - jnp.pi) ** 2 + 0.1 * x[1] ** 2 + r * u[0] ** 2)

    return control.ControlProblem(
        f, ell, lambda x: 10 * (x[0] - jnp.pi) ** 2 + x[1] ** 2, x0, 20, control_size=1
    )


def test_ilqr_warm_started_next_to_the_optimum_converges():
    """A warm start next to the optimum (as in MPC and in learning loops): the cost change
    of the full Newton step is below C's rounding, and iLQR must take it instead of
    halving α and cycling μ until max_steps (a regression)."""
    x0 = jnp.array([3.173928065445097, -0.5689103625128569])
    u_star = control.solve(_near_pendulum(10.0, 1.0, 2.0, 0.5, x0), jnp.zeros((20, 1))).controls
    p = (9.999305217102062, 0.9997768975257573, 1.9998765732507748, 0.5000491727254672)
    sol = control.solve(_near_pendulum(*p, x0), u_star, throw=False)
    assert bool(sol.converged), sol.message
    assert int(sol.num_steps) <= 5
