"""Derivatives of `control.solve` by the implicit function theorem at the KKT point:
against the differentiated Riccati formula (LQR), central finite differences, forward
mode through the solver's iterations, and across methods; vmap, jit, throw."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adjoint import control


jax.config.update("jax_enable_x64", True)

N = 12
A = jnp.array([[1.0, 0.1], [0.0, 1.0]])
B = jnp.array([[0.0], [0.1]])
X0 = jnp.array([1.0, -0.5])


def _lqr(theta, x0=X0, lower=None, upper=None, horizon=N):
    """x' = A x + b·B u, C = Σ q|x|² + r u² + 3|x_N|², theta = (q, r, b)."""
    q, r, b = theta[0], theta[1], theta[2]
    return control.ControlProblem(
        lambda x, u, k: A @ x + b * (B @ u),
        lambda x, u, k: q * x @ x + r * u @ u,
        lambda x: 3.0 * x @ x,
        x0,
        horizon,
        lower,
        upper,
        control_size=1,
    )


def _riccati_controls(theta, x0=X0):
    """The closed form: P(N) = 3I, K = (R + BᵀP'B)⁻¹BᵀP'A, P = Q + AᵀP'(A − BK),
    u(k) = −K(k) x(k); differentiable in theta by plain autodiff."""
    q, r, b = theta[0], theta[1], theta[2]
    Bb = b * B
    P, Ks = 3.0 * jnp.eye(2), []
    for _ in range(N):
        K = jnp.linalg.solve(r * jnp.eye(1) + Bb.T @ P @ Bb, Bb.T @ P @ A)
        P = q * jnp.eye(2) + A.T @ P @ (A - Bb @ K)
        Ks.append(K)
    x, us = x0, []
    for K in reversed(Ks):
        u = -K @ x
        x = A @ x + Bb @ u
        us.append(u)
    return jnp.stack(us)


THETA = jnp.array([1.0, 0.5, 1.0])


def _jit(transform):
    return lambda f, *args, **kwargs: jax.jit(transform(f, *args, **kwargs))


def _fd(f, theta, eps=1e-6):
    """Central differences of a jitted f (a new problem, i.e. new closures, built outside
    jit would compile anew at every call)."""
    cols = [(f(theta.at[i].add(eps)) - f(theta.at[i].add(-eps))) / (2 * eps) for i in range(3)]
    return jnp.stack(cols, axis=-1)


def test_lqr_matches_the_differentiated_riccati_solution():
    controls = jax.jit(lambda th: control.solve(_lqr(th)).controls)
    ref = jax.jacfwd(_riccati_controls)(THETA)
    assert np.allclose(controls(THETA), _riccati_controls(THETA), atol=1e-9)
    for jac in (jax.jacrev, jax.jacfwd):
        J = jax.jit(jac(controls))(THETA)
        assert np.max(np.abs(J - ref)) < 1e-8 * np.max(np.abs(ref))
    assert np.max(np.abs(_fd(controls, THETA) - ref)) < 1e-7


def test_cost_derivative_is_the_envelope_and_x0_gives_minus_b0():
    sol = control.solve(_lqr(THETA))
    g_theta = _jit(jax.grad)(lambda th: control.solve(_lqr(th)).cost)(THETA)
    ref = jax.grad(lambda th: _lqr(th).cost(_riccati_controls(th)))(THETA)  # C(u*(θ); θ)
    assert np.allclose(g_theta, ref, rtol=1e-9)
    g_x0 = _jit(jax.grad)(lambda x: control.solve(_lqr(THETA, x)).cost)(X0)
    assert np.allclose(g_x0, -sol.costates[0], atol=1e-10)  # dC*/dx0 = −B(0)
    # the costates carry derivatives too: B(0) = −dC*/dx0, so dB(0)/dx0 = −d²C*/dx0²
    hess = _jit(jax.hessian)(lambda x: control.solve(_lqr(THETA, x)).cost)(X0)
    jac_b0 = _jit(jax.jacrev)(lambda x: control.solve(_lqr(THETA, x)).costates[0])(X0)
    assert np.allclose(jac_b0, -hess, atol=1e-8)


def test_states_derivative_and_jvp():
    states = jax.jit(lambda th: control.solve(_lqr(th)).states)
    J = _jit(jax.jacrev)(states)(THETA)
    assert np.max(np.abs(J - _fd(states, THETA))) < 1e-7
    v = jnp.array([0.3, -1.0, 0.5])
    _, tangent = jax.jit(lambda t: jax.jvp(states, (THETA,), (t,)))(v)
    assert np.allclose(tangent, J @ v, atol=1e-10)


# ---------------------------------------------------------------- nonlinear problems

DT = 0.1


def _pendulum(theta, x0=jnp.array([0.3, 0.0]), horizon=10, bound=None):
    """Damped pendulum toward upright; theta = (g, damping, control weight)."""
    g, b, r = theta[0], theta[1], theta[2]

    def f(x, u, k):
        w = x[1] + DT * (-g * jnp.sin(x[0]) - b * x[1] + u[0])
        return jnp.stack([x[0] + DT * w, w])

    return control.ControlProblem(
        f,
        lambda x, u, k: DT * (0.1 * (x[0] - jnp.pi) ** 2 + 0.01 * x[1] ** 2 + r * u[0] ** 2),
        lambda x: 10 * (x[0] - jnp.pi) ** 2 + x[1] ** 2,
        x0,
        horizon,
        None if bound is None else -bound,
        bound,
        control_size=1,
    )


PEND = jnp.array([9.81, 0.1, 0.05])
# finite differences need the solution to round-off: DDP converges quadratically
TIGHT = control.ILQR(second_order=True, tol=1e-12)


def _unrolled_controls(make, method, u0):
    """The solver's iterations differentiated in forward mode (no implicit function)."""
    return lambda th: method.run(make(th), u0, 1e-12)[0]


@pytest.mark.parametrize("bound", [None, 3.0])
def test_pendulum_against_finite_differences_and_unrolled_forward_mode(bound):
    make = lambda th: _pendulum(th, bound=bound)
    solve = jax.jit(lambda th: control.solve(make(th), None, TIGHT))
    sol = solve(PEND)
    assert bool(sol.derivative_ok)
    if bound is not None:  # the bound is active somewhere: the active-set system is used
        assert bool(jnp.any(jnp.abs(sol.controls) >= bound - 1e-9))
    J = _jit(jax.jacrev)(lambda th: solve(th).controls)(PEND)
    J_fd = _fd(lambda th: solve(th).controls, PEND)
    assert np.max(np.abs(J - J_fd)) < 1e-6 * (1 + np.max(np.abs(J_fd)))
    u0 = jnp.zeros((10, 1))
    unrolled = _unrolled_controls(make, control.ILQR(max_steps=100), u0)
    J_unrolled = _jit(jax.jacfwd)(unrolled)(PEND)
    assert np.max(np.abs(J - J_unrolled)) < 1e-6 * (1 + np.max(np.abs(J_fd)))


def test_active_bounds_are_differentiable():
    """With |u| ≤ bound active, du/dbound is ±1 on the saturated controls, and dC*/dbound
    is the multiplier (envelope theorem)."""

    @jax.jit
    def solve(bound):
        return control.solve(_pendulum(PEND, bound=bound), None, TIGHT)

    bound = 10.0
    sol = solve(bound)
    saturated = np.abs(np.asarray(sol.controls[:, 0])) >= bound - 1e-9
    assert saturated.any() and not saturated.all()
    du = jax.jacfwd(lambda b: solve(b).controls)(bound)[:, 0]
    assert np.allclose(du[saturated], np.sign(sol.controls[saturated, 0]), atol=1e-9)
    eps = 1e-6
    du_fd = (solve(bound + eps).controls - solve(bound - eps).controls)[:, 0] / (2 * eps)
    assert np.max(np.abs(du - du_fd)) < 1e-6
    dc = jax.grad(lambda b: solve(b).cost)(bound)
    dc_fd = (solve(bound + eps).cost - solve(bound - eps).cost) / (2 * eps)
    assert dc < 0 and abs(dc - dc_fd) < 1e-6 * (1 + abs(dc_fd))


def _cartpole(theta, horizon=20):
    """Cart-pole toward a nearby upright offset; theta = (pole mass, length, weight)."""
    mp, ell, w = theta[0], theta[1], theta[2]
    mc, g, dt = 1.0, 9.81, 0.05

    def f(x, u, k):
        p, th, pd, thd = x
        s, c = jnp.sin(th), jnp.cos(th)
        den = mc + mp * s**2
        pdd = (u[0] + mp * s * (ell * thd**2 + g * c)) / den
        thdd = (-u[0] * c - mp * ell * thd**2 * c * s - (mc + mp) * g * s) / (ell * den)
        pd, thd = pd + dt * pdd, thd + dt * thdd
        return jnp.stack([p + dt * pd, th + dt * thd, pd, thd])

    return control.ControlProblem(
        f,
        lambda x, u, k: dt * (w * u[0] ** 2 + x @ x),
        lambda x: 10.0 * x @ x,
        jnp.array([0.2, 0.3, 0.0, 0.0]),
        horizon,
        control_size=1,
    )


def test_cartpole_against_finite_differences():
    theta = jnp.array([0.3, 0.5, 0.1])
    solve = jax.jit(lambda th: control.solve(_cartpole(th)))
    cost_and_last = lambda th: jnp.concatenate([solve(th).cost[None], solve(th).states[-1]])
    J = _jit(jax.jacrev)(cost_and_last)(theta)
    J_fd = _fd(cost_and_last, theta)
    assert np.allclose(J[0], J_fd[0], rtol=1e-6, atol=1e-8)  # dC*/dθ (envelope)
    assert np.max(np.abs(J[1:] - J_fd[1:])) < 1e-6 * (1 + np.max(np.abs(J_fd[1:])))


def test_the_derivative_does_not_depend_on_the_method():
    make = lambda th: _pendulum(th, bound=3.0)
    jac = {
        name: _jit(jax.jacrev)(lambda th: control.solve(make(th), None, method).controls)(PEND)
        for name, method in {
            "ilqr": control.ILQR(),
            "ddp": control.ILQR(second_order=True),
            "pg": control.ProjectedGradient(tol=1e-11, max_steps=20_000),
        }.items()
    }
    assert np.max(np.abs(jac["ilqr"] - jac["ddp"])) < 1e-8
    assert np.max(np.abs(jac["ilqr"] - jac["pg"])) < 1e-5


# ---------------------------------------------------------------- problems as data


class Pendulum(eqx.Module):
    """Dynamics as an Equinox module with array fields (learnable physics)."""

    gravity: jax.Array
    damping: jax.Array

    def __call__(self, x, u, k):
        w = x[1] + DT * (-self.gravity * jnp.sin(x[0]) - self.damping * x[1] + u[0])
        return jnp.stack([x[0] + DT * w, w])


def _running(x, u, k):
    return DT * (0.1 * (x[0] - jnp.pi) ** 2 + 0.05 * u[0] ** 2)


def _terminal(x):
    return 10 * (x[0] - jnp.pi) ** 2 + x[1] ** 2


def test_module_parameters_get_gradients():
    model = Pendulum(jnp.asarray(9.81), jnp.asarray(0.1))

    def loss(model):
        prob = control.ControlProblem(model, _running, _terminal, jnp.array([0.3, 0.0]), 10)
        return jnp.sum(control.solve(prob, jnp.zeros((10, 1))).controls ** 2)

    g = eqx.filter_grad(loss)(model)
    eps = 1e-6
    fd = (
        loss(Pendulum(jnp.asarray(9.81 + eps), model.damping))
        - loss(Pendulum(jnp.asarray(9.81 - eps), model.damping))
    ) / (2 * eps)
    assert abs(g.gravity - fd) < 1e-6 * (1 + abs(fd))


def test_problem_built_inside_jit_and_vmap():
    x0s = jnp.array([[0.3, 0.0], [0.1, 0.2], [-0.2, 0.1]])

    def loss(theta, x0):
        return jnp.sum(control.solve(_pendulum(theta, x0=x0)).controls ** 2)

    # vmap of grad: one gradient per initial state; grad of vmap: their sum
    per_x0 = jax.jit(jax.vmap(jax.grad(loss), (None, 0)))(PEND, x0s)
    total = jax.jit(_jit(jax.grad)(lambda th: jnp.sum(jax.vmap(loss, (None, 0))(th, x0s))))(PEND)
    single = jax.jit(jax.grad(loss))
    singles = jnp.stack([single(PEND, x0) for x0 in x0s])
    assert np.allclose(per_x0, singles, rtol=1e-8, atol=1e-10)
    assert np.allclose(total, singles.sum(0), rtol=1e-8, atol=1e-10)


def test_vmap_over_problems_with_bounds_and_dynamics():
    thetas = jnp.array([[9.81, 0.1, 0.05], [5.0, 0.3, 0.1]])
    bounds = jnp.array([2.0, 3.0])
    out = jax.vmap(lambda th, b: control.solve(_pendulum(th, bound=b)).cost)(thetas, bounds)
    single = jax.jit(lambda th, b: control.solve(_pendulum(th, bound=b)).cost)
    singles = [single(thetas[i], bounds[i]) for i in range(2)]
    assert np.allclose(out, singles, rtol=1e-10)


@pytest.mark.standard_promotion  # the test's dynamics multiply float64 A by the float32 state
def test_float32():
    theta = THETA.astype(jnp.float32)
    make = lambda th: _lqr(th, X0.astype(jnp.float32))
    sol = control.solve(make(theta))
    assert sol.controls.dtype == jnp.float32
    g = _jit(jax.grad)(lambda th: jnp.sum(control.solve(make(th)).controls ** 2))(theta)
    ref = _jit(jax.grad)(lambda th: jnp.sum(_riccati_controls(th) ** 2))(THETA)
    assert g.dtype == jnp.float32
    assert np.allclose(g, ref, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- honest derivatives


def test_unconverged_solve_raises_or_is_flagged():
    make = lambda th: _pendulum(th, bound=3.0)
    method = control.GradientDescent(max_steps=2)
    with pytest.raises(Exception, match="maximum number of steps"):
        control.solve(make(PEND), None, method)
    with pytest.raises(Exception, match="maximum number of steps"):
        jax.jit(_jit(jax.grad)(lambda th: control.solve(make(th), None, method).cost))(PEND)
    sol = control.solve(make(PEND), None, method, throw=False)
    assert not bool(sol.converged) and not bool(sol.derivative_ok)


def _double_well(x, u, k):
    return jnp.sum(u**4 - u**2) + 0 * jnp.sum(x)


def test_indefinite_reduced_hessian_is_reported_not_divided_by():
    """u = 0 is a stationary point of ℓ = u⁴ − u², a maximum: KKT holds, the reduced
    Hessian is −2 < 0."""
    prob = control.ControlProblem(
        lambda x, u, k: x, _double_well, lambda x: jnp.sum(x**2), jnp.zeros(1), 3, control_size=1
    )
    method = control.GradientDescent()
    with pytest.raises(Exception, match="reduced Hessian"):
        control.solve(prob, jnp.zeros((3, 1)), method, pontryagin=False)
    sol = control.solve(prob, jnp.zeros((3, 1)), method, pontryagin=False, throw=False)
    assert bool(sol.converged) and not bool(sol.hessian_ok)
    assert float(sol.min_pivot) == pytest.approx(-2.0)
    assert "not positive definite" in sol.message

    def shifted(a):
        p = control.ControlProblem(
            lambda x, u, k: x,
            lambda x, u, k: _double_well(x, u, k) + a * jnp.sum(u),
            lambda x: jnp.sum(x**2),
            jnp.zeros(1),
            3,
            control_size=1,
        )
        return control.solve(p, jnp.zeros((3, 1)), method, pontryagin=False, throw=False)

    du = jax.jacfwd(lambda a: shifted(a).controls)(0.0)
    assert bool(jnp.all(jnp.isnan(du)))  # flagged as NaN, never a silent number


# ---------------------------------------------------------------- bad input


def test_bad_input_messages():
    bad = Pendulum(jnp.ones(3), jnp.asarray(0.1))  # gravity of the wrong shape
    with pytest.raises(
        ValueError, match="dynamics must return a state of shape \\(2,\\); got \\(2, 3\\)"
    ):
        control.ControlProblem(bad, _running, _terminal, jnp.zeros(2), 5, control_size=1)
    model = Pendulum(jnp.asarray(9.81), jnp.asarray(0.1))
    prob = control.ControlProblem(model, _running, _terminal, jnp.zeros(2), 5)
    assert prob.control_size is None
    assert control.solve(prob, jnp.zeros((5, 1))).controls.shape == (5, 1)
    two = lambda x, u, k: x + jnp.eye(2) @ u  # two controls, not three
    with pytest.raises(ValueError, match="m = 3 from u_init"):
        control.solve(
            control.ControlProblem(two, _running, _terminal, jnp.zeros(2), 5), jnp.zeros((5, 3))
        )
    with pytest.raises(ValueError, match="control size is unknown"):
        control.solve(prob)
    with pytest.raises(ValueError, match="upper must be a scalar, shape \\(m,\\) = \\(2,\\)"):
        control.ControlProblem(
            model, _running, _terminal, jnp.zeros(2), 5, [-1.0, -1.0], [1.0, 1.0, 1.0]
        )
    with pytest.raises(ValueError, match="lower > upper"):
        control.ControlProblem(model, _running, _terminal, jnp.zeros(2), 5, 1.0, -1.0)
    with pytest.raises(Exception, match="lower > upper"):  # traced bounds: checked at run time
        jax.jit(lambda b: control.solve(_pendulum(PEND, bound=b)).cost)(-1.0)


# ---------------------------------------------------------------- MPC


def test_mpc_closed_loop_and_its_gradient():
    mpc = control.MPC(steps=6)

    def rollout(theta):
        return mpc(_pendulum(theta, x0=jnp.array([0.0, 0.0]), horizon=8, bound=3.0))

    traj = jax.jit(rollout)(PEND)
    assert traj.states.shape == (7, 2) and traj.controls.shape == (6, 1)
    assert bool(jnp.all(traj.converged))
    # the first applied control is the first control of the open-loop optimum
    first = control.solve(_pendulum(PEND, x0=jnp.array([0.0, 0.0]), horizon=8, bound=3.0))
    assert np.allclose(traj.controls[0], first.controls[0], atol=1e-8)
    loss = jax.jit(lambda th: jnp.sum((rollout(th).states[:, 0] - 1.0) ** 2))
    g = jax.jit(jax.grad(loss))(PEND)
    assert np.allclose(g, _fd(loss, PEND), rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="one initial state"):
        mpc(_pendulum(PEND, x0=jnp.zeros((2, 2))))
    with pytest.raises(ValueError, match=r"x0 must have shape \(n,\) = \(2,\); got \(3,\)"):
        mpc(_pendulum(PEND), x0=jnp.zeros(3))
    with pytest.raises(ValueError, match="steps must be a positive int"):
        control.MPC(steps=0)
    unsized = control.ControlProblem(
        Pendulum(jnp.asarray(9.8), jnp.asarray(0.1)), _running, _terminal, jnp.zeros(2), 4
    )
    with pytest.raises(ValueError, match="MPC: the control size is unknown"):
        mpc(unsized)
    with pytest.raises(ValueError, match="u_init has 2 controls per stage, the problem 1"):
        _pendulum(PEND).with_control_size(2)
