"""Continuous-time costates (Hamilton's equations) against diffrax's own adjoints."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import adjoint as adj

from .helpers import directional_fd, random_like, tree_max_rel_error, tree_vdot


def _vector_field(t, x, p):
    return jnp.tanh(x @ p["w"].T + p["b"]) * (1 + 0.1 * jnp.sin(t))


def _running(t, x, p):
    return 0.1 * jnp.sum(x**2) + 0.01 * jnp.sum(p["w"] ** 2)


def _terminal(x):
    return jnp.sum((x - 0.5) ** 2)


@pytest.fixture
def problem(getkey):
    n, patterns = 3, 2
    params = {
        "w": 0.8 * jax.random.normal(getkey(), (n, n)) / n**0.5,
        "b": 0.1 * jax.random.normal(getkey(), (n,)),
    }
    x0 = jax.random.normal(getkey(), (patterns, n))
    kwargs = dict(t0=0.0, t1=1.5, dt0=0.05, running_cost=_running, terminal_cost=_terminal)
    return params, x0, kwargs


def test_costate_ode_matches_diffrax_adjoints(problem, getkey):
    params, x0, kwargs = problem
    report = adj.compare_costate_gradients(_vector_field, params, x0, **kwargs)
    assert float(report.rel_diff_recursive_checkpoint) < 1e-9
    assert float(report.rel_diff_backsolve) < 1e-9
    assert tree_max_rel_error(report.costate_ode, report.recursive_checkpoint) < 1e-9
    assert float(jnp.abs(report.costate_ode["w"]).max()) > 1e-2
    # and finite differences of C computed by the forward solve alone
    sol = adj.costate_ode(_vector_field, params, x0, **kwargs)

    def cost(p):
        return adj.costate_ode(_vector_field, p, x0, **kwargs).value

    direction = random_like(getkey(), params)
    fd = directional_fd(cost, params, direction, eps=1e-6)
    assert abs(float(tree_vdot(sol.grads, direction)) - float(fd)) < 1e-7 * max(1, abs(float(fd)))
    # boundary condition of the costate, paper's sign: B(t1) = −∂Φ/∂X(t1)
    assert jnp.allclose(sol.final_costate, -2 * (sol.final_state - 0.5))


def test_trajectory_cost_custom_vjp(problem):
    params, x0, kwargs = problem
    grads, x0_grad = jax.jit(
        jax.grad(lambda p, x: adj.trajectory_cost(_vector_field, p, x, **kwargs), argnums=(0, 1))
    )(params, x0)
    ref = adj.diffrax_gradient(
        _vector_field, params, x0, adjoint=diffrax.RecursiveCheckpointAdjoint(), **kwargs
    )
    assert tree_max_rel_error(grads, ref) < 1e-9
    sol = adj.costate_ode(_vector_field, params, x0, **kwargs)
    assert jnp.allclose(x0_grad, -sol.initial_costate, atol=1e-12)  # dC/dx0 = −B(t0)
    # reference for dC/dx0: plain jax.grad through the discretised solve
    ref_x0 = jax.grad(lambda x: _dto_cost(params, x, kwargs))(x0)
    assert tree_max_rel_error(x0_grad, ref_x0) < 1e-9


def _dto_cost(params, x0, kwargs):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, p: (_vector_field(t, y[0], p), _running(t, y[0], p))),
        diffrax.Tsit5(),
        kwargs["t0"],
        kwargs["t1"],
        kwargs["dt0"],
        (x0, jnp.zeros(())),
        args=params,
    )
    return sol.ys[1][-1] + _terminal(sol.ys[0][-1])


def test_linear_analytic_gradient():
    # dX/dt = a X, C = X(T)² = x0² e^{2aT}:  dC/da = 2 T x0² e^{2aT}, B(0) = −2 x0 e^{2aT}.
    a, x0, t1 = 0.3, jnp.array([1.5]), 2.0
    sol = adj.costate_ode(
        lambda t, x, a: a * x,
        jnp.asarray(a),
        x0,
        t0=0.0,
        t1=t1,
        terminal_cost=lambda x: jnp.sum(x**2),
        stepsize_controller=diffrax.PIDController(rtol=1e-11, atol=1e-11),
        dt0=0.01,
    )
    exact = 2 * t1 * 1.5**2 * jnp.exp(2 * a * t1)
    assert abs(float(sol.grads) - float(exact)) < 1e-8 * float(exact)
    assert abs(float(sol.initial_costate[0]) + 2 * 1.5 * float(jnp.exp(2 * a * t1))) < 1e-7
    assert abs(float(sol.value) - 1.5**2 * float(jnp.exp(2 * a * t1))) < 1e-8


def test_errors(problem):
    params, x0, kwargs = problem
    with pytest.raises(ValueError, match="running_cost"):
        adj.costate_ode(_vector_field, params, x0, t0=0.0, t1=1.0, dt0=0.1)
    with pytest.raises(ValueError, match="dt0"):
        adj.costate_ode(_vector_field, params, x0, **dict(kwargs, dt0=None))
    with pytest.raises(ValueError, match="vector_field must return shape"):
        adj.costate_ode(lambda t, x, p: x.sum(), params, x0, **kwargs)
    with pytest.raises(ValueError, match="terminal_cost must return shape"):
        adj.costate_ode(_vector_field, params, x0, **dict(kwargs, terminal_cost=lambda x: x))
    with pytest.raises(Exception, match="max_steps|maximum number of solver steps"):
        adj.costate_ode(_vector_field, params, x0, **dict(kwargs, max_steps=3))


def test_any_pytree_parameters():
    """An `eqx.nn.MLP` (non-array leaves: its activation functions) as W: its arrays are
    differentiated, the rest is static; checked against `jax.grad` through diffrax."""
    mlp = eqx.nn.MLP(2, 2, 8, 1, activation=jnp.tanh, key=jax.random.key(0), dtype=jnp.float64)
    vf = lambda t, x, w: w(x)
    x0 = jnp.array([0.5, -0.2])
    kw = dict(t0=0.0, t1=1.0, dt0=0.01, terminal_cost=lambda x: jnp.sum(x**2))
    sol = adj.costate_ode(vf, mlp, x0, **kw)
    g = eqx.filter_jit(eqx.filter_grad(lambda m: adj.trajectory_cost(vf, m, x0, **kw)))(mlp)

    def reference(m):
        term = diffrax.ODETerm(lambda t, x, args: m(x))
        ys = diffrax.diffeqsolve(term, diffrax.Tsit5(), 0.0, 1.0, 0.01, x0).ys
        return jnp.sum(ys[-1] ** 2)

    ref = eqx.filter_jit(eqx.filter_grad(reference))(mlp)
    assert tree_max_rel_error(eqx.filter(sol.grads, eqx.is_array), ref) < 1e-6
    assert tree_max_rel_error(eqx.filter(g, eqx.is_array), ref) < 1e-6


def test_optimise_then_discretise_cost_is_diffrax_backsolve(problem):
    """`trajectory_cost(mode="optimise-then-discretise")` differentiates by diffrax's
    BacksolveAdjoint: the same backward costate ODE as `costate_ode`'s own pass."""
    params, x0, kwargs = problem
    otd = dict(kwargs, mode="optimise-then-discretise")
    grads, x0_grad = eqx.filter_jit(
        jax.grad(lambda p, x: adj.trajectory_cost(_vector_field, p, x, **otd), argnums=(0, 1))
    )(params, x0)
    sol = adj.costate_ode(_vector_field, params, x0, **otd)
    assert tree_max_rel_error(grads, sol.grads) < 1e-10
    assert tree_max_rel_error(x0_grad, -sol.initial_costate) < 1e-10
