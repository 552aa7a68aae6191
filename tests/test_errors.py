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


@pytest.mark.parametrize("stacked", [False, True])
def test_check_finite_covers_the_input(stacked, getkey):
    """+inf in x0: tanh saturates, so every state X(k ≥ 1) and costate is finite, but
    dC/dW(1) = Y(1) X(0)ᵀ = 0 · inf is NaN. check_finite=True checks X(0) itself."""
    stages = [aj.Dense(3, 3, key=k) for k in jax.random.split(getkey(), 2)]
    build = aj.Multistage.stack if stacked else aj.Multistage
    x0 = jnp.ones((2, 3)).at[0, 0].set(jnp.inf)
    grad = eqx.filter_jit(eqx.filter_grad(lambda s, x: jnp.sum(s(x) ** 2)))
    unchecked = grad(build(stages), x0)  # the silent wrong answer
    assert not all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(unchecked))
    with pytest.raises(Exception, match=r"X\(0\): the input x0 is non-finite"):
        jax.block_until_ready(grad(build(stages, check_finite=True), x0))


@pytest.mark.parametrize("stacked", [False, True])
def test_check_finite_covers_the_control_gradients(stacked, getkey):
    """States and costates finite, one stage's control gradient NaN: named as such."""

    class BadGrad(aj.Dense):
        def costate(self, x_prev, x_next, b_next):
            b_prev, ct = super().costate(x_prev, x_next, b_next)
            bad = jnp.where(jnp.abs(self.bias[0]) < 9, 1.0, jnp.nan)
            return b_prev, eqx.tree_at(lambda s: s.weight, ct, ct.weight * bad)

    stages = [BadGrad(3, 3, key=k) for k in jax.random.split(getkey(), 3)]
    stages[1] = eqx.tree_at(lambda s: s.bias, stages[1], stages[1].bias.at[0].set(10.0))
    build = aj.Multistage.stack if stacked else aj.Multistage
    grad = eqx.filter_jit(eqx.filter_grad(lambda s: jnp.sum(s(jnp.ones((2, 3))) ** 2)))
    unchecked = grad(build(stages))
    assert not all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(unchecked))
    with pytest.raises(Exception, match=r"stage 2: control gradient dC/dW\(2\) became non-finite"):
        jax.block_until_ready(grad(build(stages, check_finite=True)))
