"""adjoint.problems: each classic problem against its known answer, and the CLI entry."""

import argparse
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adjoint import control, problems
from adjoint.control import cli

from .helpers import finite_difference_grad, tree_max_rel_error


def test_riccati_gives_the_lqr_optimum():
    """At u = −K(k)X(k) the gradient vanishes and B(k) = −2 P(k) X(k)."""
    A, B = np.array([[1.0, 0.1], [0.0, 1.0]]), np.array([[0.0], [0.1]])
    Q, R, P = np.eye(2), np.array([[0.5]]), 3 * np.eye(2)
    x0 = np.array([1.0, -0.5])
    N = 12
    prob = problems.lqr(A, B, Q, R, P, x0, N)
    Ps, Ks = problems.riccati(A, B, Q, R, P, N)
    assert Ps.shape == (N + 1, 2, 2) and Ks.shape == (N, 1, 2)
    x, xs, us = x0, [x0], []
    for k in range(N):
        us.append(-Ks[k] @ x)
        x = A @ x + B @ us[-1]
        xs.append(x)
    value, states, b, grad = eqx.filter_jit(lambda p, u: p.costates(u))(
        prob, jnp.asarray(np.stack(us))
    )
    assert float(jnp.max(jnp.abs(grad))) < 1e-12
    expected = np.stack([-2 * Ps[k] @ xs[k] for k in range(N + 1)])
    assert np.max(np.abs(b[:, 0] - expected)) < 1e-12
    assert float(value) == pytest.approx(float(x0 @ Ps[0] @ x0), rel=1e-12)


def test_double_integrator_is_bang_bang():
    prob = problems.double_integrator()
    sol = control.solve(prob, jnp.zeros((prob.horizon, 1)))
    assert bool(sol.converged), sol.message
    u = np.asarray(sol.controls[:, 0])
    sigma = np.asarray(problems.switching_function(prob, sol.states, sol.costates)[:, 0])
    # σ(k) is affine in k (λ_p constant, λ_v affine), so there is at most one switch ...
    assert np.max(np.abs(np.diff(sigma, 2))) < 1e-10
    assert np.sum(np.diff(np.sign(sigma)) != 0) <= 1
    # ... and u(k) = −sign σ(k) saturates wherever σ(k) ≠ 0 (theory: bang-bang)
    clear = np.abs(sigma) > 1e-6
    assert clear.sum() >= prob.horizon - 1
    assert np.all(u[clear] == -np.sign(sigma[clear]))
    # from p = 3 the boat first accelerates towards the origin, then brakes
    assert u[0] == -1.0 and u[-1] == 1.0
    assert np.sum(np.diff(u) != 0) <= 2  # one switch (possibly through one interior sample)
    assert np.all(sol.kkt.multipliers_lower[u == -1.0] > 0)
    assert np.all(sol.kkt.multipliers_upper[u == 1.0] > 0)


def test_zermelo_navigation_law():
    prob = problems.zermelo()
    sol = control.solve(prob, jnp.zeros((prob.horizon, 1)), control.ILQR(second_order=True))
    assert bool(sol.converged), sol.message
    theta = np.asarray(sol.controls[:, 0])
    assert np.max(np.abs(theta - problems.zermelo_heading(prob.horizon))) < 1e-6
    # tan θ(k) decreases linearly with slope −s Δt
    assert np.allclose(np.diff(np.tan(theta)), -0.05, atol=1e-6)


def test_cartpole_gradient(getkey):
    prob = problems.cartpole(horizon=10)
    u = jax.random.normal(getkey(), (10, 1))
    g = jax.grad(prob.cost)(u)
    assert tree_max_rel_error(g, finite_difference_grad(eqx.filter_jit(prob.cost), u)) < 1e-7
    _, _, b, grad = eqx.filter_jit(lambda p, u: p.costates(u))(prob, u)
    assert tree_max_rel_error(grad, g) < 1e-12
    assert b.shape == (11, 1, 4)


def test_make():
    assert problems.make("cart-pole".replace("-", ""), horizon=7).horizon == 7
    assert problems.make("double-integrator").horizon == 30
    with pytest.raises(ValueError, match="unknown problem 'moon'"):
        problems.make("moon")


def test_cli_pendulum_swing_up(tmp_path):
    parser = argparse.ArgumentParser(prog="adjoint")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["control", "pendulum", "--out", str(tmp_path), "--method", "ddp"])
    summary = args.func(args)
    assert summary["converged"], summary["message"]
    assert abs(summary["final_state"][0] - np.pi) < 1e-2  # upright
    assert abs(summary["final_state"][1]) < 1e-2  # at rest
    assert (tmp_path / "pendulum.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "pendulum.json").read_text())["cost"] == summary["cost"]
    with pytest.raises(SystemExit):
        parser.parse_args(["control", "moon"])


def test_acrobot_equations_of_motion():
    """Spong's acrobot: without torque its vector field conserves the energy
    (dE/dt = ∇E · ẋ = 0), with it dE/dt = q̇₂ u (the torque's power), and q̈ equals the
    Euler–Lagrange equations of L = T − V derived by automatic differentiation."""
    rng = np.random.default_rng(0)
    states = jnp.asarray(rng.uniform(-3, 3, size=(6, 4)))
    torques = jnp.asarray(rng.uniform(-5, 5, size=(6, 1)))

    def lagrangian(q, dq):
        x = jnp.concatenate([q, dq])
        kinetic = problems.acrobot_energy(x) - problems.acrobot_energy(x.at[2:].set(0.0))
        return kinetic - problems.acrobot_energy(x.at[2:].set(0.0))

    def euler_lagrange(x, u):
        # d/dt ∂L/∂q̇ = ∂L/∂q + (0, u):  M q̈ = ∂L/∂q − (∂²L/∂q̇∂q) q̇ + (0, u)
        q, dq = x[:2], x[2:]
        mass = jax.hessian(lagrangian, argnums=1)(q, dq)
        mixed = jax.jacfwd(jax.grad(lagrangian, argnums=1), argnums=0)(q, dq)
        force = jax.grad(lagrangian, argnums=0)(q, dq) - mixed @ dq + jnp.stack([0.0, u[0]])
        return jnp.linalg.solve(mass, force)

    @jax.jit
    @jax.vmap
    def check(x, u):
        dE = jax.grad(problems.acrobot_energy)(x)
        free = dE @ problems.acrobot_vector_field(x, 0 * u)
        driven = dE @ problems.acrobot_vector_field(x, u)
        return free, driven, problems.acrobot_vector_field(x, u)[2:], euler_lagrange(x, u)

    free, driven, ddq, expected = check(states, torques)
    assert float(jnp.max(jnp.abs(free))) < 1e-10
    np.testing.assert_allclose(driven, states[:, 3] * torques[:, 0], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ddq, expected, rtol=1e-10, atol=1e-10)
    assert float(jnp.max(jnp.abs(ddq))) > 1.0  # the check is not vacuous
