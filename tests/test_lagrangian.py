"""The Lagrangian's three conditions, the Hamiltonian and the gradient-parity helper."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import adjoint as aj

from .helpers import assert_tree_allclose, finite_difference_grad
from .test_multistage import SYSTEMS, intermediate_cost, squared_error, with_autodiff


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_kkt_residuals_vanish(name, getkey):
    system, xshape, dshape = SYSTEMS[name](getkey())
    x0 = jax.random.normal(getkey(), xshape)
    target = jax.random.normal(getkey(), dshape)
    cost = intermediate_cost(target)
    decay = lambda s: 0.05 * jnp.sum(jax.tree.leaves(eqx.filter(s, eqx.is_inexact_array))[0] ** 2)
    rec = aj.costates(system, x0, cost, control_cost=decay)
    kkt = aj.kkt_residuals(system, x0, rec.states, rec.costates, cost, control_cost=decay)
    n = system.n_stages
    assert kkt.forward_norms.shape == kkt.backward_norms.shape == kkt.optimality_norms.shape == (n,)
    assert float(jnp.max(kkt.forward_norms)) < 1e-13  # X(k) − f_k(X(k-1)) on the forward pass
    assert float(jnp.max(kkt.backward_norms)) < 1e-12
    # the optimality part equals dC/dW, computed independently by jax.grad
    ref = eqx.filter_grad(lambda s: cost(s.trajectory(x0)) + decay(s))(with_autodiff(system))
    assert_tree_allclose(kkt.optimality.stages, ref.stages, rtol=1e-10)
    assert_tree_allclose(rec.grads.stages, ref.stages, rtol=1e-10)
    assert "stage" in kkt.table()


def test_kkt_names_the_broken_stage(getkey):
    """Perturb one costate: only the backward residual of the affected states moves."""
    system, xshape, dshape = SYSTEMS["tuple"](getkey())
    x0 = jax.random.normal(getkey(), xshape)
    cost = squared_error(jax.random.normal(getkey(), dshape))
    rec = aj.costates(system, x0, cost)
    bad = list(rec.costates)
    bad[1] = bad[1] + 0.1  # B(2) wrong
    kkt = aj.kkt_residuals(system, x0, rec.states, tuple(bad), cost)
    norms = kkt.backward_norms
    assert float(norms[1]) > 0.05  # ∂L/∂X(2) contains B(2) directly
    assert float(norms[0]) > 1e-3  # ∂L/∂X(1) reads B(2) through stage 2
    assert float(norms[2]) < 1e-12 and float(norms[3]) < 1e-12
    states = list(rec.states)
    states[3] = states[3] + 0.1  # X(3) off the forward pass
    kkt = aj.kkt_residuals(system, x0, tuple(states), rec.costates, cost)
    # stage 3 is the first to break ∂L/∂B = 0 (stage 4 reads the moved X(3) too)
    assert int(jnp.argmax(kkt.forward_norms > 1e-12)) == 2
    assert float(kkt.forward_norms[2]) == pytest.approx(0.1)


def test_boundary_condition_squared_error(getkey):
    """B(N) = 2 (D − X(N)) for C = Σ |D − X(N)|² (the paper's sign)."""
    for name in ("tuple", "stacked-tanh"):
        system, xshape, dshape = SYSTEMS[name](getkey())
        x0 = jax.random.normal(getkey(), xshape)
        target = jax.random.normal(getkey(), dshape)
        rec = aj.costates(system, x0, squared_error(target))
        assert jnp.allclose(rec.costates[-1], 2 * (target - rec.states[-1]), rtol=1e-14)
        assert jnp.allclose(rec.value, jnp.sum((target - rec.states[-1]) ** 2))


def test_paper_recursion_for_dense(getkey):
    """Y(k) = F'(A(k)) B(k), B(k-1) = W(k)ᵀ Y(k), dC/dW(k) = −Σ_p Y(k) X(k-1)ᵀ."""
    system, xshape, dshape = SYSTEMS["tuple"](getkey())
    x0 = jax.random.normal(getkey(), xshape)
    target = jax.random.normal(getkey(), dshape)
    rec = aj.costates(system, x0, squared_error(target))
    x, b = rec.states, rec.costates
    stage = system.stages[0]  # tanh
    y = (1 - x[1] ** 2) * b[0]
    assert jnp.allclose(rec.grads.stages[0].weight, -(y.T @ x[0]), rtol=1e-12)
    assert jnp.allclose(rec.initial_costate, y @ stage.weight, rtol=1e-12)


def test_initial_costate_matches_finite_differences(getkey):
    system, _, _ = SYSTEMS["tuple"](getkey())
    x0 = jax.random.normal(getkey(), (2, 3))
    target = jax.random.normal(getkey(), (2, 2))
    cost = intermediate_cost(target, k=2)
    rec = aj.costates(system, x0, cost)
    fd = finite_difference_grad(lambda x: cost(system.trajectory(x)), x0)
    assert jnp.allclose(rec.initial_costate, -fd, rtol=1e-7, atol=1e-9)
    with pytest.warns(DeprecationWarning, match="use initial_costate"):
        assert rec.input_costate is rec.initial_costate  # the old name, for one release


def test_hamiltonian_derivatives_give_the_recursion(getkey):
    """∂H(k)/∂X(k-1) = B's share of B(k-1); ∂H(k)/∂W(k) = −dC/dW(k) for a final cost."""
    system, xshape, dshape = SYSTEMS["stacked-tanh"](getkey())
    x0 = jax.random.normal(getkey(), xshape)
    rec = aj.costates(system, x0, squared_error(jax.random.normal(getkey(), dshape)))
    k = 3
    dh_dx = jax.grad(lambda x: aj.hamiltonian(system, k, x, rec.costates[k - 1]))(rec.states[k - 1])
    assert jnp.allclose(dh_dx, rec.costates[k - 2], rtol=1e-12)
    h = aj.hamiltonian(system, k, rec.states[k - 1], rec.costates[k - 1])
    assert jnp.allclose(h, jnp.vdot(rec.costates[k - 1], rec.states[k]))
    # H is linear in B and equals Bᵀ f_k(X(k-1)) for one pattern too
    h1 = aj.hamiltonian(system, k, rec.states[k - 1][0], rec.costates[k - 1][0])
    assert jnp.allclose(h1, jnp.vdot(rec.costates[k - 1][0], rec.states[k][0]))


@pytest.mark.parametrize("name", ["tuple", "stacked-tanh", "user-stage"])
def test_check_gradients_report(name, getkey):
    system, xshape, dshape = SYSTEMS[name](getkey())
    x0 = jax.random.normal(getkey(), xshape)
    report = aj.check_gradients(system, x0, squared_error(jax.random.normal(getkey(), dshape)))
    assert report.autodiff_error.shape == (system.n_stages,)
    ad, fd = report.worst
    assert ad < 1e-12 and fd < 1e-6
    assert float(report.input_finite_difference_error) < 1e-6
    assert "input B(0)" in report.table()


class WrongAdjoint(aj.Dense):
    """A stage whose analytic adjoint is off by 10% on its weight gradient."""

    def costate(self, x_prev, x_next, b_next):
        b_prev, ct = super().costate(x_prev, x_next, b_next)
        return b_prev, eqx.tree_at(lambda s: s.weight, ct, 1.1 * ct.weight)


def test_check_gradients_finds_a_wrong_stage(getkey):
    keys = jax.random.split(getkey(), 3)
    system = aj.Multistage(
        [aj.Dense(3, 4, key=keys[0]), WrongAdjoint(4, 4, key=keys[1]), aj.Dense(4, 2, key=keys[2])]
    )
    x0 = jax.random.normal(getkey(), (5, 3))
    report = aj.check_gradients(system, x0, squared_error(jnp.ones((5, 2))))
    assert report.worst_stage() == 2
    assert float(report.autodiff_error[1]) > 0.05
    assert float(report.autodiff_error[0]) < 1e-12 and float(report.autodiff_error[2]) < 1e-12
    assert float(report.finite_difference_error[1]) > 1e-3


@pytest.mark.parametrize("name", ["tuple", "stacked-tanh"])
def test_lagrangian_tools_under_jit(name, getkey):
    system, xshape, dshape = SYSTEMS[name](getkey())
    x0 = jax.random.normal(getkey(), xshape)
    cost = squared_error(jax.random.normal(getkey(), dshape))

    @eqx.filter_jit
    def run(system, x0):
        rec = aj.costates(system, x0, cost)
        return rec, aj.kkt_residuals(system, x0, rec.states, rec.costates, cost)

    rec, kkt = run(system, x0)
    assert float(jnp.max(kkt.backward_norms)) < 1e-12
    assert_tree_allclose(kkt.optimality.stages, rec.grads.stages, rtol=1e-10)


@pytest.mark.parametrize("stacked", [False, True])
def test_tables_one_stage_short_are_refused(stacked, getkey):
    """A 1-row costate table for a 2-stage system would be zipped against the stages
    and silently drop a term of L: the lengths and shapes are checked first."""
    stages = [aj.Dense(3, 3, key=k) for k in jax.random.split(getkey(), 2)]
    system = aj.Multistage.stack(stages) if stacked else aj.Multistage(stages)
    x0 = jax.random.normal(getkey(), (4, 3))
    cost = squared_error(jnp.zeros((4, 3)))
    rec = aj.costates(system, x0, cost)
    xs, bs = rec.states, rec.costates
    for fn in (aj.lagrangian, aj.kkt_residuals):
        name = fn.__name__
        with pytest.raises(ValueError, match=rf"{name}: costates must hold B\(1..2\).*2.*got 1"):
            fn(system, x0, xs, bs[:1], cost)
        with pytest.raises(ValueError, match=rf"{name}: states must hold X\(0..2\).*3.*got 2"):
            fn(system, x0, xs[:2], bs, cost)
        with pytest.raises(ValueError, match=rf"{name}: states must hold X\(0..2\).*3.*got 2"):
            fn(system, x0, bs, xs, cost)  # the two tables swapped
    if not stacked:
        with pytest.raises(ValueError, match=r"costates\[1\] \(B\(2\)\) has shape \(3, 3\)"):
            aj.lagrangian(system, x0, xs, (bs[0], bs[1][:3]), cost)
    assert jnp.allclose(aj.lagrangian(system, x0, xs, bs, cost), rec.value)
