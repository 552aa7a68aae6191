"""General constraints: closed forms, feasibility, multipliers as sensitivities,
infeasibility, derivatives through constrained solutions, bad input."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adjoint
from adjoint import control, problems


jax.config.update("jax_enable_x64", True)

DT = 0.1
A = np.array([[1.0, DT], [0.0, 1.0]])
B = np.array([[0.5 * DT**2], [DT]])


def _lq_terminal_reference(Q, R, x0, N, e, target):
    """min Σ_k x(k)ᵀQx(k) + u(k)ᵀRu(k) s.t. x(k+1) = A x(k) + B u(k), eᵀx(N) = target,
    as one dense KKT system in (x(1..N), u(0..N-1)) with the dynamics written as
    X(k) − f = 0: its multipliers are the paper's B(1..N) and ν (NumPy, independent of
    the library)."""
    n, m = B.shape
    nz = N * n + N * m
    xi = lambda k: slice((k - 1) * n, k * n)  # x(k), k = 1..N
    ui = lambda k: slice(N * n + k * m, N * n + (k + 1) * m)
    H = np.zeros((nz, nz))
    for k in range(1, N):
        H[xi(k), xi(k)] = 2 * Q
    for k in range(N):
        H[ui(k), ui(k)] = 2 * R
    J = np.zeros((N * n + 1, nz))
    b = np.zeros(N * n + 1)
    for k in range(N):
        rows = slice(k * n, (k + 1) * n)
        J[rows, xi(k + 1)] = np.eye(n)
        J[rows, ui(k)] = -B
        if k == 0:
            b[rows] = A @ x0
        else:
            J[rows, xi(k)] = -A
    J[-1, xi(N)] = e
    b[-1] = target
    K = np.block([[H, J.T], [J, np.zeros((J.shape[0], J.shape[0]))]])
    sol = np.linalg.solve(K, np.concatenate([np.zeros(nz), b]))
    z, y = sol[:nz], sol[nz:]
    X = np.concatenate([x0[None], z[: N * n].reshape(N, n)])
    u = z[N * n :].reshape(N, m)
    costates = y[: N * n].reshape(N, n)
    b0 = -(2 * Q @ x0 + A.T @ -costates[0])  # B(0) = −∂L/∂X(0) by the recursion
    return u, X, np.concatenate([b0[None], costates]), y[-1]


def test_terminal_equality_lq_matches_closed_forms():
    # minimum energy to a goal: the Gramian closed form
    problem = problems.goal_double_integrator(horizon=20, dt=DT)
    solution = control.solve(problem)
    u, X, costates, nu = problems.goal_double_integrator_solution(horizon=20, dt=DT)
    assert solution.result == adjoint.RESULTS.successful and bool(solution.converged)
    np.testing.assert_allclose(solution.controls, u, atol=1e-6)
    np.testing.assert_allclose(solution.states, X, atol=1e-6)
    np.testing.assert_allclose(solution.costates, costates, atol=1e-6)
    np.testing.assert_allclose(solution.multipliers.terminal_equality, nu, atol=1e-6)
    # warm start from the solution: a KKT point already, no outer iteration
    again = control.solve(problem, solution.controls, multipliers=solution.multipliers)
    assert int(again.num_steps) == 0 and again.result == adjoint.RESULTS.successful
    np.testing.assert_allclose(again.controls, solution.controls, atol=1e-12)

    # LQR with a state cost and one terminal condition: the dense constrained KKT system
    Q, R, x0, N = np.eye(2), np.array([[0.5]]), np.array([1.0, -0.5]), 25
    e, target = np.array([1.0, 0.0]), 0.3
    lq = control.ControlProblem(
        lambda x, u, k: A @ x + B @ u,
        lambda x, u, k: x @ Q @ x + u @ R @ u,
        lambda x: jnp.zeros((), x.dtype),
        x0,
        N,
        control_size=1,
        terminal_equality=lambda x: jnp.reshape(e @ x - target, (1,)),
    )
    solution = control.solve(lq)
    u, X, costates, nu = _lq_terminal_reference(Q, R, x0, N, e, target)
    np.testing.assert_allclose(solution.controls, u, atol=1e-6)
    np.testing.assert_allclose(solution.states, X, atol=1e-6)
    np.testing.assert_allclose(solution.costates, costates, atol=1e-6)
    np.testing.assert_allclose(solution.multipliers.terminal_equality, [nu], atol=1e-6)


def _car_rollout(u, dt):
    """The kinematic car of `problems.car_obstacle` in NumPy."""
    x = np.zeros(4)
    xs = [x]
    for k in range(len(u)):
        px, py, psi, v = x
        x = np.array(
            [
                px + dt * v * np.cos(psi),
                py + dt * v * np.sin(psi),
                psi + dt * v * u[k, 0],
                v + dt * u[k, 1],
            ]
        )
        xs.append(x)
    return np.stack(xs)


CENTRE = (1.5, 0.1)


@jax.jit
def _car_solve(radius, goal_x):
    # the built-in problem, built under jit with traced radius and goal; solved to 1e-12 so
    # that central differences of the optimal cost (step 1e-5) are good to 1e-7
    method = control.AugmentedLagrangian(tol=1e-12)
    return control.solve(problems.car_obstacle(radius=radius, goal=(goal_x, 0.0)), method=method)


def test_car_around_obstacle_feasible_multipliers_and_derivatives():
    # from zero controls (the car at rest: a degenerate linearisation)
    r, gx, eps = 0.6, 3.0, 1e-5
    solution = _car_solve(r, gx)
    assert solution.result == adjoint.RESULTS.successful and bool(solution.derivative_ok)
    X = _car_rollout(np.asarray(solution.controls), 5.0 / 25)
    np.testing.assert_allclose(X, solution.states, atol=1e-10)
    h = r**2 - np.sum((X[:-1, :2] - np.asarray(CENTRE)) ** 2, axis=1)
    assert np.max(h) <= 1e-6, "the path enters the obstacle"
    np.testing.assert_allclose(X[-1, [0, 1, 3]], [gx, 0.0, 0.0], atol=1e-6)
    mu = np.asarray(solution.multipliers.inequality[:, 0])
    active = h >= -1e-6
    assert active.any() and np.all(mu[active] > 1e-3) and np.all(mu[~active] == 0)

    # the multipliers are the optimal cost's sensitivities to the right-hand sides:
    # h = r² − |p − c|² ≤ 0 has rhs −r², so dC*/dr = 2r Σμ; the goal's is −ν
    cost = lambda a, b: _car_solve(a, b).cost
    fd_r = (cost(r + eps, gx) - cost(r - eps, gx)) / (2 * eps)
    fd_g = (cost(r, gx + eps) - cost(r, gx - eps)) / (2 * eps)
    mult = solution.multipliers
    np.testing.assert_allclose(2 * r * jnp.sum(mult.inequality), fd_r, rtol=1e-6)
    np.testing.assert_allclose(-mult.terminal_equality[0], fd_g, rtol=1e-6)

    # derivatives through the constrained solution (implicit, active set held)
    dr, dg = jax.grad(cost, argnums=(0, 1))(r, gx)
    np.testing.assert_allclose([dr, dg], [fd_r, fd_g], rtol=1e-6)
    controls = lambda a: _car_solve(a, gx).controls
    du = jax.jacfwd(controls)(r)
    du_fd = (controls(r + eps) - controls(r - eps)) / (2 * eps)
    np.testing.assert_allclose(du, du_fd, atol=1e-6 * float(jnp.max(jnp.abs(du_fd))))


def test_cartpole_track_limit():
    problem = problems.cartpole_track()
    solution = control.solve(problem)
    assert bool(solution.converged)
    p = np.asarray(solution.states[:, 0])
    assert np.max(np.abs(p)) <= 0.5 + 1e-6
    np.testing.assert_allclose(solution.states[-1], [0.0, np.pi, 0.0, 0.0], atol=1e-6)
    mu = np.asarray(solution.multipliers.inequality)
    slack = np.stack([p[:-1] - 0.5, -p[:-1] - 0.5], 1)
    assert np.all(mu >= 0) and np.all(mu[slack < -1e-6] == 0)


def test_infeasible_and_nonfinite_are_reported():
    base = problems.goal_double_integrator()
    # |u| ≤ 0.1 moves the cart at most 0.1 in 2 s: the goal p = 1 is out of reach
    tight = control.ControlProblem(
        base.dynamics,
        base.running_cost,
        base.terminal_cost,
        base.x0[0],
        base.horizon,
        -0.1,
        0.1,
        control_size=1,
        terminal_equality=base.terminal_equality,
    )
    solution = control.solve(tight, throw=False)
    assert solution.result == adjoint.RESULTS.infeasible and not bool(solution.converged)
    assert "infeasible" in solution.message
    assert float(solution.kkt.equality_violation) > 0.5
    with pytest.raises(eqx.EquinoxRuntimeError, match="constraints could not be satisfied"):
        control.solve(tight)

    nan = control.ControlProblem(
        base.dynamics,
        base.running_cost,
        base.terminal_cost,
        base.x0[0],
        base.horizon,
        control_size=1,
        terminal_equality=lambda x: x - jnp.array([jnp.nan, 0.0]),
    )
    solution = control.solve(nan, throw=False)
    assert solution.result == adjoint.RESULTS.nonfinite and not bool(solution.converged)


def test_built_under_jit_and_vmap_float32():
    @jax.jit
    @jax.vmap
    def solve_to(goal):
        problem = control.ControlProblem(
            lambda x, u, k: A @ x + B @ u,
            lambda x, u, k: 0.5 * (u @ u),
            lambda x: jnp.zeros((), x.dtype),
            jnp.zeros(2),
            20,
            control_size=1,
            terminal_equality=lambda x: x - jnp.stack([goal, 0.0]),
        )
        solution = control.solve(problem)
        return solution.controls, solution.multipliers.terminal_equality

    u, nu = solve_to(jnp.array([1.0, -0.5]))
    for i, goal in enumerate((1.0, -0.5)):
        u_ref, _, _, nu_ref = problems.goal_double_integrator_solution(goal=(goal, 0.0))
        np.testing.assert_allclose(u[i], u_ref, atol=1e-8)
        np.testing.assert_allclose(nu[i], nu_ref, atol=1e-8)

    solution = control.solve(problems.goal_double_integrator(dtype=jnp.float32))
    assert solution.controls.dtype == jnp.float32 and bool(solution.converged)
    assert float(solution.kkt.equality_violation) <= 1e-4


def _problem(**constraints):
    base = problems.goal_double_integrator()
    return control.ControlProblem(
        base.dynamics,
        base.running_cost,
        base.terminal_cost,
        base.x0[0],
        base.horizon,
        control_size=1,
        **constraints,
    )


@pytest.mark.parametrize(
    "constraints, match",
    [
        ({"terminal_equality": lambda x: x[0] - 1.0}, r"terminal_equality must return a vector"),
        (
            {"equality": lambda x, u, k: jnp.zeros((1, 1))},
            r"equality must return a vector.*\(1, 1\)",
        ),
        ({"inequality": lambda x, u, k: jnp.zeros((0,))}, r"inequality returns no rows"),
        (
            {"equality": lambda x, u, k: jnp.stack([u[0], x[0]])},
            r"40 equality rows .* exceed the 20",
        ),
        ({"terminal_equality": lambda x: jnp.ones(3)}, r"terminal_equality has 3 rows"),
        ({"inequality": lambda x, u, k: x[5:6]}, None),
        ({"equality": "x = 0"}, r"equality must be callable"),
    ],
)
def test_bad_constraints_are_refused(constraints, match):
    error = TypeError if match and "callable" in match else ValueError
    with pytest.raises(error, match=match or "inequality"):
        _problem(**constraints)


def test_bad_method_batch_and_multipliers_are_refused():
    problem = problems.goal_double_integrator()
    with pytest.raises(TypeError, match="ignores the problem's equality/inequality"):
        control.solve(problem, method=control.ILQR())
    with pytest.raises(ValueError, match="one initial state"):
        control.ControlProblem(
            problem.dynamics,
            problem.running_cost,
            problem.terminal_cost,
            jnp.zeros((2, 2)),
            20,
            control_size=1,
            terminal_equality=problem.terminal_equality,
        )
    wrong = control.Multipliers(jnp.zeros((20, 0)), jnp.zeros((20, 0)), jnp.zeros(3), jnp.zeros(0))
    with pytest.raises(ValueError, match=r"multipliers.terminal_equality must have shape \(2,\)"):
        control.solve(problem, multipliers=wrong)
