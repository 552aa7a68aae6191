"""The costate recursion against jax.grad of a plain forward and finite differences."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adjoint as aj
import adjoint.control  # noqa: F401  (aj.control)

from .helpers import assert_tree_allclose, directional_fd, random_like, tree_vdot


class MyStage(aj.AbstractStage):
    """A user's stage without an analytic adjoint: x ↦ sin(W x) + x * c."""

    weight: jax.Array
    c: jax.Array

    def __init__(self, n, *, key):
        self.weight = jax.random.normal(key, (n, n)) / n**0.5
        self.c = jnp.linspace(0.5, 1.5, n)

    def __call__(self, x):
        return jnp.sin(self.weight @ x) + x * self.c


def tuple_system(key, activations=("tanh", "sigmoid", "relu", "identity"), sizes=(3, 5, 4, 4, 2)):
    keys = jax.random.split(key, len(activations))
    return aj.Multistage(
        [
            aj.Dense(sizes[i], sizes[i + 1], act, key=k)
            for i, (act, k) in enumerate(zip(activations, keys))
        ]
    )


def stacked_system(key, n=4, depth=5, activation="tanh"):
    stage = eqx.filter_vmap(lambda k: aj.Dense(n, n, activation, key=k))(
        jax.random.split(key, depth)
    )
    return aj.Multistage(stage)


def with_autodiff(system):
    return eqx.tree_at(lambda s: s.adjoint, system, aj.AutodiffAdjoint())


def squared_error(target):
    return lambda states: jnp.sum((target - states[-1]) ** 2)


def intermediate_cost(target, k=1, weight=0.3):
    return lambda states: jnp.sum((target - states[-1]) ** 2) + weight * jnp.sum(jnp.cos(states[k]))


def grads_both(system, x0, cost, control_cost=None):
    def total(s, x):
        c = cost(s.trajectory(x))
        return c if control_cost is None else c + control_cost(s)

    g = eqx.filter_grad(lambda args: total(*args))((system, x0))
    r = eqx.filter_grad(lambda args: total(*args))((with_autodiff(system), x0))
    return g, r


SYSTEMS = {
    "tuple": lambda key: (tuple_system(key), (6, 3), (6, 2)),
    "tuple-sigmoid": lambda key: (
        tuple_system(key, ("sigmoid", "sigmoid"), (3, 4, 2)),
        (6, 3),
        (6, 2),
    ),
    "stacked-tanh": lambda key: (stacked_system(key), (6, 4), (6, 4)),
    "stacked-relu": lambda key: (stacked_system(key, activation="relu"), (6, 4), (6, 4)),
    "user-stage": lambda key: (
        aj.Multistage([aj.Dense(3, 4, key=key), MyStage(4, key=jax.random.fold_in(key, 1))]),
        (6, 3),
        (6, 4),
    ),
    "user-activation": lambda key: (
        aj.Multistage([aj.Dense(3, 4, jnp.sin, key=key), aj.Dense(4, 2, jax.nn.softplus, key=key)]),
        (6, 3),
        (6, 2),
    ),
    "stacked-user-stage": lambda key: (
        aj.Multistage.stack([MyStage(3, key=k) for k in jax.random.split(key, 3)]),
        (5, 3),
        (5, 3),
    ),
    # the paper's shared weights: W shared by every stage, checkpoints every 2 stages
    "stacked-shared": lambda key: (
        shared_weight_system(key, n=4, checkpoint_every=2),
        (6, 4),
        (6, 4),
    ),
    # a recurrent net is the same stacked system over its cell (one pattern: the batch)
    "recurrent": lambda key: (
        aj.RecurrentNet(aj.ElmanCell(2, 4, key=key), checkpoint_every=2).multistage(
            jnp.zeros((6, 4)), jax.random.normal(jax.random.fold_in(key, 1), (5, 6, 2))
        )[0],
        (1, 6, 4),
        (1, 6, 4),
    ),
    # an optimal-control problem is the same stacked system over its dynamics, with the
    # running cost carried as one more state (the controls u(k) are its weights)
    "control": lambda key: (
        control_system(key),
        (6, 3),
        (6, 3),
    ),
}


def _pendulum_dynamics(x, u, k):  # one explicit Euler step of a damped pendulum
    return x + 0.1 * jnp.stack([x[1], -jnp.sin(x[0]) - 0.1 * x[1] + u[0]])


def control_system(key, horizon=4):
    problem = aj.control.ControlProblem(
        _pendulum_dynamics,
        lambda x, u, k: jnp.sum(x**2) + 0.1 * jnp.sum(u**2),
        lambda x: jnp.sum(x**2),
        jnp.zeros(2),
        horizon,
        control_size=1,
    )
    return problem.system(jax.random.normal(key, (horizon, 1)))


@pytest.mark.parametrize("name", sorted(SYSTEMS))
@pytest.mark.parametrize("cost_kind", ["final", "intermediate"])
def test_gradient_equals_autodiff_and_fd(name, cost_kind, getkey):
    system, xshape, dshape = SYSTEMS[name](getkey())
    x0 = jax.random.normal(getkey(), xshape)
    target = jax.random.normal(getkey(), dshape)
    cost = squared_error(target) if cost_kind == "final" else intermediate_cost(target)
    g, r = grads_both(system, x0, cost)
    assert_tree_allclose(g, r, rtol=1e-10)
    # directional finite differences in the controls and in x0
    params, static = eqx.partition((system, x0), eqx.is_inexact_array)
    v = random_like(getkey(), params)

    def f(p):
        s, x = eqx.combine(p, static)
        return cost(s.trajectory(x))

    fd = directional_fd(f, params, v, eps=1e-6)
    an = tree_vdot(g, v)
    assert abs(float(an - fd)) <= 1e-7 * max(1.0, abs(float(an)))


def test_weight_decay_and_jit_grad(getkey):
    system, _, _ = SYSTEMS["tuple"](getkey())
    x0 = jax.random.normal(getkey(), (6, 3))
    target = jax.random.normal(getkey(), (6, 2))

    def decay(s):
        return 0.01 * sum(jnp.sum(w**2) for w in jax.tree.leaves(eqx.filter(s, eqx.is_array)))

    g, r = grads_both(system, x0, squared_error(target), control_cost=decay)
    assert_tree_allclose(g, r, rtol=1e-10)
    jitted = eqx.filter_jit(
        eqx.filter_grad(lambda s: squared_error(target)(s.trajectory(x0)) + decay(s))
    )
    assert_tree_allclose(jitted(system), g[0], rtol=1e-12)


def test_single_pattern_and_shapes(getkey):
    system = stacked_system(getkey(), n=4, depth=3)
    x = jax.random.normal(getkey(), (4,))
    traj = system.trajectory(x)
    assert traj.shape == (4, 4)
    assert system(x).shape == (4,)
    tsys = tuple_system(getkey())
    traj = tsys.trajectory(jnp.ones(3))
    assert [t.shape for t in traj] == [(3,), (5,), (4,), (4,), (2,)]
    batch = tsys.trajectory(jnp.ones((7, 3)))
    assert [t.shape for t in batch] == [(7, 3), (7, 5), (7, 4), (7, 4), (7, 2)]


_NUMPY_ACTIVATIONS = {
    "tanh": np.tanh,
    "sigmoid": lambda a: 1 / (1 + np.exp(-a)),
    "relu": lambda a: np.maximum(a, 0),
    "identity": lambda a: a,
}


# measured: 1.7e-16 (float64), 6.7e-8 (float32 against the float64 formula)
@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-14), (jnp.float32, 1e-5)])
@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no-bias"])
def test_dense_forward_is_the_formula(dtype, tol, use_bias, getkey):
    """Dense: X(k) = F(W X(k-1) + b) against the formula in NumPy (float64), one pattern
    and a batch, every named activation and a callable; W, b ~ U(−1/√in, 1/√in); the
    unrolled and stacked cascades are the formula applied stage after stage."""
    x = np.random.default_rng(0).normal(size=(7, 5))
    for name, f in [*_NUMPY_ACTIVATIONS.items(), (jnp.sin, np.sin)]:
        d = aj.Dense(5, 4, name, use_bias=use_bias, dtype=dtype, key=getkey())
        assert d.weight.shape == (4, 5) and d.weight.dtype == dtype
        assert (d.bias is None) == (not use_bias)
        w = np.asarray(d.weight, np.float64)
        b = np.zeros(4) if d.bias is None else np.asarray(d.bias, np.float64)
        assert np.abs(w).max() <= 1 / 5**0.5 and np.abs(b).max() <= 1 / 5**0.5
        ref = f(x @ w.T + b)
        assert np.abs(np.asarray(jax.vmap(d)(jnp.asarray(x, dtype))) - ref).max() < tol, name
        assert np.abs(np.asarray(d(jnp.asarray(x[2], dtype))) - ref[2]).max() < tol, name
    # cascades: X(k) = tanh(W(k) X(k-1) + b(k)), k = 1..3, in both layouts
    stages = [aj.Dense(5, 5, use_bias=use_bias, dtype=dtype, key=getkey()) for _ in range(3)]
    states = [x]
    for s in stages:
        bias = 0 if s.bias is None else np.asarray(s.bias, np.float64)
        states.append(np.tanh(states[-1] @ np.asarray(s.weight, np.float64).T + bias))
    unrolled = aj.Multistage(stages).trajectory(jnp.asarray(x, dtype))
    stacked = aj.Multistage.stack(stages).trajectory(jnp.asarray(x, dtype))
    for k in range(4):
        assert np.abs(np.asarray(unrolled[k]) - states[k]).max() < tol
        assert np.abs(np.asarray(stacked[k]) - states[k]).max() < tol


def test_vmap_of_grad_and_grad_of_vmap(getkey):
    system = tuple_system(getkey())
    xs = jax.random.normal(getkey(), (5, 3))
    target = jax.random.normal(getkey(), (2,))

    def loss(s, x):
        return jnp.sum((target - s(x)) ** 2)

    per = jax.vmap(eqx.filter_grad(loss), in_axes=(None, 0))(system, xs)
    per_ref = jax.vmap(eqx.filter_grad(loss), in_axes=(None, 0))(with_autodiff(system), xs)
    assert_tree_allclose(per, per_ref, rtol=1e-10)
    summed = eqx.filter_grad(lambda s: jnp.sum(jax.vmap(lambda x: loss(s, x))(xs)))(system)
    assert_tree_allclose(jax.tree.map(lambda a: a.sum(0), per), summed, rtol=1e-10)


@pytest.mark.parametrize("name", ["tuple", "stacked-tanh"])
def test_grad_of_grad(name, getkey):
    """The backward pass is differentiable JAX: second derivatives match autodiff."""
    system, xshape, dshape = SYSTEMS[name](getkey())
    x0 = jax.random.normal(getkey(), xshape)
    target = jax.random.normal(getkey(), dshape)
    cost = squared_error(target)

    def grad_norm(x, s):
        g = eqx.filter_grad(lambda s_: cost(s_.trajectory(x)))(s)
        return sum(jnp.sum(a**2) for a in jax.tree.leaves(g))

    hv = jax.grad(grad_norm)(x0, system)
    hv_ref = jax.grad(grad_norm)(x0, with_autodiff(system))
    assert_tree_allclose(hv, hv_ref, rtol=1e-9)


def test_float32_runs(getkey):
    key = getkey()
    system = aj.Multistage(
        [
            aj.Dense(3, 8, dtype=jnp.float32, key=key),
            aj.Dense(8, 2, "sigmoid", dtype=jnp.float32, key=key),
        ]
    )
    x0 = jax.random.normal(getkey(), (6, 3), jnp.float32)
    target = jnp.ones((6, 2), jnp.float32)
    g, r = grads_both(system, x0, squared_error(target))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(g))
    assert_tree_allclose(g, r, rtol=1e-5)


@pytest.mark.standard_promotion  # optax's Adam bias correction: a Python float to an int32 power
def test_optax_training_reduces_loss(getkey):
    x, y = aj.datasets.parity(3)
    keys = jax.random.split(getkey(), 2)
    system = aj.Multistage([aj.Dense(3, 8, key=keys[0]), aj.Dense(8, 1, key=keys[1])])
    opt = optax.adam(0.05)
    state = opt.init(eqx.filter(system, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(system, state):
        loss, g = eqx.filter_value_and_grad(lambda s: jnp.sum((y - s(x)) ** 2))(system)
        updates, state = opt.update(g, state)
        return eqx.apply_updates(system, updates), state, loss

    first = None
    for _ in range(300):
        system, state, loss = step(system, state)
        first = loss if first is None else first
    assert float(loss) < 0.05 * float(first)


def test_stack_equals_tuple(getkey):
    stages = [aj.Dense(4, 4, key=k) for k in jax.random.split(getkey(), 3)]
    x0 = jax.random.normal(getkey(), (5, 4))
    target = jax.random.normal(getkey(), (5, 4))
    cost = intermediate_cost(target, k=2)
    tup, stk = aj.Multistage(stages), aj.Multistage.stack(stages)
    assert stk.n_stages == 3 and stk.stacked and not tup.stacked
    rt, rs = aj.costates(tup, x0, cost), aj.costates(stk, x0, cost)
    for k in range(3):
        assert jnp.allclose(rt.costates[k], rs.costates[k], rtol=1e-12, atol=1e-14)
        assert jnp.allclose(rt.grads.stages[k].weight, rs.grads.stages.weight[k], rtol=1e-12)


def _unit(a):
    """A user's activation that is not elementwise: a / |a| over one pattern's units."""
    return a / jnp.linalg.norm(a)


@pytest.mark.parametrize("stacked", [False, True])
def test_activation_that_mixes_units(stacked, getkey):
    """F'(A) is a full matrix for a / |a|: the costate step transposes F with jax.vjp per
    pattern (the analytic diagonal is used only for the named elementwise activations),
    matching jax.grad of a hand-written forward and finite differences."""
    stages = [aj.Dense(3, 3, _unit, key=k) for k in jax.random.split(getkey(), 2)]
    system = aj.Multistage.stack(stages) if stacked else aj.Multistage(stages)
    x0 = jax.random.normal(getkey(), (5, 3))
    target = jax.random.normal(getkey(), (5, 3))
    weights = [(s.weight, s.bias) for s in stages]

    def plain(weights, x):
        for w, b in weights:
            a = x @ w.T + b
            x = a / jnp.linalg.norm(a, axis=1, keepdims=True)
        return jnp.sum((target - x) ** 2 * jnp.arange(1.0, 4.0))

    def cost(states):
        return jnp.sum((target - states[-1]) ** 2 * jnp.arange(1.0, 4.0))

    g, gx = eqx.filter_grad(lambda args: cost(args[0].trajectory(args[1])))((system, x0))
    ref, ref_x = jax.grad(plain, argnums=(0, 1))(weights, x0)
    ours = (
        [(g.stages.weight[k], g.stages.bias[k]) for k in range(2)]
        if stacked
        else [(s.weight, s.bias) for s in g.stages]
    )
    assert_tree_allclose(ours, ref, rtol=1e-10)
    assert_tree_allclose(gx, ref_x, rtol=1e-10)
    v = random_like(getkey(), weights)
    fd = directional_fd(lambda w: plain(w, x0), weights, v, eps=1e-6)
    assert abs(float(tree_vdot(ours, v) - fd)) <= 1e-7 * max(1.0, abs(float(fd)))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("stacked", [False, True])
def test_mixed_dtypes_give_each_control_its_own_dtype(dtype, stacked, getkey):
    """float16/bfloat16 controls with a float32 x0: the states are float32, and the
    custom VJP returns each gradient in its control's dtype, as jax.grad does."""
    stages = [aj.Dense(3, 3, dtype=dtype, key=k) for k in jax.random.split(getkey(), 2)]
    system = aj.Multistage.stack(stages) if stacked else aj.Multistage(stages)
    x0 = jax.random.normal(getkey(), (4, 3), jnp.float32)

    def loss(s, x):
        return jnp.sum(jnp.sin(s(x)))

    g, gx = eqx.filter_grad(lambda args: loss(*args))((system, x0))
    r, rx = eqx.filter_grad(lambda args: loss(*args))((with_autodiff(system), x0))
    assert gx.dtype == rx.dtype == jnp.float32
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(r)):
        assert a.dtype == b.dtype == dtype
    assert_tree_allclose(
        jax.tree.map(lambda a: a.astype(jnp.float32), g),
        jax.tree.map(lambda a: a.astype(jnp.float32), r),
        rtol=1e-2,
    )
    rec = aj.costates(system, x0, lambda xs: jnp.sum(jnp.sin(xs[-1])))
    assert all(a.dtype == dtype for a in jax.tree.leaves(rec.grads))


# --------------------------------------------------------------------------------------
# Shared leaves and checkpointing on the stacked layout
# --------------------------------------------------------------------------------------


def shared_weight_system(key, n=3, depth=5, dtype=jnp.float64, **kwargs):
    """A stacked Dense whose weight W is shared by every stage, biases b(k) per stage."""
    wkey, bkey = jax.random.split(key)
    stage = aj.Dense(n, n, key=wkey, dtype=dtype)
    bias = jax.random.normal(bkey, (depth, n), dtype) * 0.3
    stage = eqx.tree_at(lambda s: s.bias, stage, bias)
    return aj.Multistage(stage, shared=lambda s: s.weight, **kwargs)


def _plain_shared(weight, bias, x0):  # the reference: X(k) = tanh(W X(k-1) + b(k))
    def step(x, b):
        x = jnp.tanh(x @ weight.T + b)
        return x, x

    return jax.lax.scan(step, x0, bias)[0]


@pytest.mark.parametrize("every", [1, 2, 5])  # N = 5: 1 and 5 divide it, 2 does not
def test_shared_leaves_and_checkpoints(every, getkey):
    system = shared_weight_system(getkey(), checkpoint_every=every)
    assert system.n_stages == 5 and system.stage(2).bias.shape == (3,)
    x0 = jax.random.normal(getkey(), (4, 3))
    ref_w, ref_b, ref_x = jax.grad(
        lambda w, b, x: jnp.sum(jnp.sin(_plain_shared(w, b, x))), argnums=(0, 1, 2)
    )(system.stages.weight, system.stages.bias, x0)

    @eqx.filter_jit
    @eqx.filter_grad
    def grad(args):
        system, x0 = args
        return jnp.sum(jnp.sin(system(x0)))

    for adj in (aj.CostateAdjoint(), aj.AutodiffAdjoint()):
        g_sys, g_x = grad((eqx.tree_at(lambda s: s.adjoint, system, adj), x0))
        assert g_sys.stages.weight.shape == (3, 3)  # summed over the stages, not stacked
        assert_tree_allclose((g_sys.stages.weight, g_sys.stages.bias, g_x), (ref_w, ref_b, ref_x))
    if every != 2:
        return
    # float32 under vmap over patterns' batches, against the float64 reference
    to32 = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, t
    )
    batch = jnp.stack([x0, 2 * x0]).astype(jnp.float32)
    g32 = jax.vmap(lambda x: grad((to32(system), x))[0].stages.weight)(batch)
    assert g32.dtype == jnp.float32 and g32.shape == (2, 3, 3)
    assert_tree_allclose(g32[0], ref_w, rtol=1e-4)


def test_shared_leaves_bad_input(getkey):
    with pytest.raises(ValueError, match="stacked layout"):
        aj.Multistage([aj.Dense(2, 2, key=getkey())], checkpoint_every=2)
    with pytest.raises(ValueError, match="checkpoint_every must be None or a positive int"):
        shared_weight_system(getkey(), checkpoint_every=0)
    with pytest.raises(TypeError, match="shared must be a function"):
        aj.Multistage(shared_weight_system(getkey()).stages, shared="weight")
    system = shared_weight_system(getkey(), checkpoint_every=2, check_finite=True)
    x0 = jnp.ones((2, 3)).at[0, 0].set(jnp.inf)
    with pytest.raises(Exception, match="input x0 is non-finite"):
        system(x0)
    big = eqx.tree_at(lambda s: s.stages.bias, system, system.stages.bias.at[3].set(jnp.nan))
    with pytest.raises(Exception, match=r"stage 4: state X\(4\) became non-finite"):
        big(jnp.ones((2, 3)))
