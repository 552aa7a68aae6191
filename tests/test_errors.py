"""Bad input gets a clear error naming the stage, the shape or the value at fault."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import adjoint as aj


def test_stages_that_do_not_chain(getkey):
    with pytest.raises(
        ValueError,
        match=r"stage 1 \(Dense\) outputs states of shape \(5,\).*stage 2 \(Dense\) expects shape \(4,\)",
    ):
        aj.Multistage([aj.Dense(3, 5, key=getkey()), aj.Dense(4, 2, key=getkey())])


class Squash(aj.AbstractStage):
    def __call__(self, x):
        return jnp.reshape(x, (2, 2)) @ jnp.ones(2)


def test_user_stage_that_cannot_take_the_shape(getkey):
    with pytest.raises(
        ValueError,
        match=r"stage 2 \(Squash\) cannot take a state of shape \(3,\) from stage 1 \(Dense\)",
    ):
        aj.Multistage([aj.Dense(2, 3, key=getkey()), Squash()])


def test_wrong_x0_size(getkey):
    system = aj.Multistage([aj.Dense(3, 2, key=getkey())])
    with pytest.raises(
        ValueError, match=r"x0 has shape \(4, 5\).*expects one pattern of shape \(3,\)"
    ):
        system(jnp.ones((4, 5)))
    with pytest.raises(TypeError, match="floating"):
        system(jnp.ones((4, 3), jnp.int32))


def test_empty_and_wrong_types(getkey):
    with pytest.raises(ValueError, match="at least one stage"):
        aj.Multistage([])
    with pytest.raises(TypeError, match="stage 2 must be an adjoint.AbstractStage"):
        aj.Multistage([aj.Dense(2, 2, key=getkey()), jnp.tanh])
    with pytest.raises(ValueError, match="unknown activation 'tahn'"):
        aj.Dense(2, 2, "tahn", key=getkey())
    with pytest.raises(ValueError, match="in_size must be a positive int"):
        aj.Dense(0, 2, key=getkey())


def test_single_stage_is_not_a_stack(getkey):
    with pytest.raises(ValueError, match=r"pass a list: Multistage\(\[stage\]\)"):
        aj.Multistage(aj.Dense(3, 4, key=getkey()))


def test_stacked_slices_must_keep_the_shape(getkey):
    stage = eqx.filter_vmap(lambda k: aj.Dense(3, 4, key=k))(jax.random.split(getkey(), 2))
    with pytest.raises(ValueError, match=r"same shape; Dense maps \(3,\) to \(4,\)"):
        aj.Multistage(stage)


def test_non_scalar_cost(getkey):
    system = aj.Multistage([aj.Dense(3, 2, key=getkey())])
    with pytest.raises(ValueError, match=r"cost must return a scalar.*\(4, 2\)"):
        aj.costates(system, jnp.ones((4, 3)), lambda xs: xs[-1] ** 2)


@pytest.mark.parametrize("stacked", [False, True])
def test_nonfinite_state_names_the_stage(stacked, getkey):
    stages = [aj.Dense(3, 3, "identity", key=k) for k in jax.random.split(getkey(), 4)]
    # stage 3 multiplies by 1e200: X(3) overflows to inf in float64... only if the input is large
    stages[2] = eqx.tree_at(lambda s: s.weight, stages[2], stages[2].weight * 1e300)
    build = aj.Multistage.stack if stacked else aj.Multistage
    system = build(stages, check_finite=True)
    x0 = jnp.full((2, 3), 1e10)

    @jax.jit
    def run(x):
        return system(x)

    with pytest.raises(Exception, match="stage 3: state X\\(3\\) became non-finite"):
        jax.block_until_ready(run(x0))
    # without the check, the same forward pass silently returns non-finite values
    unchecked = build(stages)
    assert not bool(jnp.isfinite(unchecked(x0)).all())


def test_nonfinite_costate_names_the_stage(getkey):
    class Blowup(aj.Dense):
        def costate(self, x_prev, x_next, b_next):
            b_prev, ct = super().costate(x_prev, x_next, b_next)
            return b_prev * jnp.inf, ct

    keys = jax.random.split(getkey(), 3)
    system = aj.Multistage(
        [aj.Dense(3, 3, key=keys[0]), Blowup(3, 3, key=keys[1]), aj.Dense(3, 3, key=keys[2])],
        check_finite=True,
    )
    grad = eqx.filter_jit(eqx.filter_grad(lambda s: jnp.sum(s(jnp.ones((2, 3))) ** 2)))
    with pytest.raises(Exception, match=r"stage 1: costate B\(1\) became non-finite"):
        jax.block_until_ready(grad(system))


def test_nonfinite_costate_names_the_stage_stacked(getkey):
    class Blowup(aj.Dense):
        def costate(self, x_prev, x_next, b_next):
            b_prev, ct = super().costate(x_prev, x_next, b_next)
            return b_prev * jnp.where(jnp.abs(self.bias[0]) < 9, 1.0, jnp.inf), ct

    stages = [Blowup(3, 3, key=k) for k in jax.random.split(getkey(), 4)]
    stages[2] = eqx.tree_at(lambda s: s.bias, stages[2], stages[2].bias.at[0].set(10.0))
    system = aj.Multistage.stack(stages, check_finite=True)
    grad = eqx.filter_jit(eqx.filter_grad(lambda s: jnp.sum(s(jnp.ones((2, 3))) ** 2)))
    # stage 3's costate step produces B(2) = inf
    with pytest.raises(Exception, match=r"stage 2: costate B\(2\) became non-finite"):
        jax.block_until_ready(grad(system))
