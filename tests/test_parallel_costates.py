"""`ParallelCostates`: the core's costate recursion by an associative scan."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import adjoint as aj

from .helpers import assert_tree_allclose
from .test_multistage import MyStage, shared_weight_system


def _cost(states):  # costs on every state, so the recursion has per-stage terms
    return jnp.sum(jnp.arange(states.shape[0])[:, None, None] * jnp.sin(states))


@eqx.filter_jit
@eqx.filter_grad
def _grad_trajectory(args):
    system, x0 = args
    return _cost(system.trajectory(x0))


@eqx.filter_jit
@eqx.filter_grad
def _grad_final(args):
    system, x0 = args
    return jnp.sum(system(x0) ** 2)


def _with(system, adj):
    return eqx.tree_at(lambda s: s.adjoint, system, adj)


@pytest.mark.standard_promotion  # the test's cost weighs float64 states by int64 stage indices
def test_parallel_equals_sequential_on_a_user_stage(getkey):
    """A stacked user stage without an analytic adjoint (2-D states per pattern)."""
    stage = eqx.filter_vmap(lambda k: MyStage(3, key=k))(jax.random.split(getkey(), 6))
    system = aj.Multistage(stage, adjoint=aj.ParallelCostates())
    x0 = jax.random.normal(getkey(), (4, 3))
    got = _grad_trajectory((system, x0))
    ref = _grad_trajectory((_with(system, aj.AutodiffAdjoint()), x0))
    assert_tree_allclose(got, ref, rtol=1e-12)


def test_parallel_shared_leaves_checkpointed(getkey):
    system = shared_weight_system(getkey(), adjoint=aj.ParallelCostates(), checkpoint_every=2)
    x0 = jax.random.normal(getkey(), (2, 3))
    got = _grad_final((system, x0))
    ref = _grad_final((_with(system, aj.CostateAdjoint()), x0))
    assert got[0].stages.weight.shape == (3, 3)
    assert_tree_allclose(got, ref, rtol=1e-12)


def test_parallel_float32_vmap_and_tuple_layout(getkey):
    system = shared_weight_system(getkey(), dtype=jnp.float32, adjoint=aj.ParallelCostates())
    x0 = jax.random.normal(getkey(), (3, 2, 3), jnp.float32)
    got = jax.vmap(lambda x: _grad_final((system, x)))(x0)
    ref = jax.vmap(lambda x: _grad_final((_with(system, aj.CostateAdjoint()), x)))(x0)
    assert got[0].stages.weight.dtype == jnp.float32
    assert_tree_allclose(got, ref, rtol=1e-5)
    tuple_system = aj.Multistage([aj.Dense(2, 2, key=getkey())], adjoint=aj.ParallelCostates())
    with pytest.raises(ValueError, match="ParallelCostates needs the stacked layout"):
        jax.grad(lambda x: jnp.sum(tuple_system(x)))(jnp.ones((1, 2)))
