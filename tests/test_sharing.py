"""Parameter transforms, shared weights, convolution as tied weights, tie multipliers."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adjoint

from .helpers import (
    directional_fd,
    finite_difference_grad,
    random_like,
    tree_max_rel_error,
    tree_vdot,
)


_costates = eqx.filter_jit(adjoint.costates)  # one compile instead of op-by-op


def _cost(states):
    return jnp.sum(jnp.sin(states[-1])) + 0.5 * jnp.sum(states[-1] ** 2)


CONV_CASES = [
    # in_shape, out_channels, kernel, stride, padding, dilation
    ((1, 10), 2, 4, 2, ((2, 1),), 1),
    ((2, 11), 2, 3, 3, "SAME", 2),
    ((3, 7, 6), 2, (3, 2), (2, 1), ((1, 0), (1, 1)), (1, 2)),
]


def _lax_conv(x, kernel, bias, stride, pads, dilation):
    a = jax.lax.conv_general_dilated(x, kernel, stride, pads, rhs_dilation=dilation)
    return jnp.tanh(a + bias.reshape((-1,) + (1,) * (a.ndim - 2)))


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_as_tied_weights_matches_lax_conv(case, getkey):
    in_shape, c_out, kernel_size, stride, padding, dilation = case
    conv = adjoint.Conv(
        in_shape,
        c_out,
        kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        key=getkey(),
    )
    shared = conv.to_shared_dense()
    imap = conv.index_map()
    x = jax.random.normal(getkey(), (3, *in_shape))
    head = adjoint.Dense(int(np.prod(conv.out_shape)), 2, key=getkey())

    @jax.jit
    def plain(kernel, bias, x):  # the reference: lax.conv_general_dilated and jax.grad
        a = _lax_conv(x, kernel, bias, conv.stride, conv.padding, conv.dilation)
        return _cost((jax.vmap(head)(a.reshape(a.shape[0], -1)),))

    ref = _lax_conv(x, conv.kernel, conv.bias, conv.stride, conv.padding, conv.dilation)
    assert ref.shape[1:] == conv.out_shape == imap.out_shape
    # Outputs: structured path and tied dense matrix.
    assert tree_max_rel_error(jax.vmap(conv)(x), ref) < 1e-13
    flat = jax.vmap(shared)(x.reshape(3, -1))
    assert tree_max_rel_error(flat, ref.reshape(3, -1)) < 1e-13
    # Gradients: costate recursion through each form against jax.grad through lax.conv.
    g_kernel, g_bias, g_x = jax.jit(jax.grad(plain, argnums=(0, 1, 2)))(conv.kernel, conv.bias, x)

    @eqx.filter_jit
    def loss_and_grads(system, x0):
        loss = lambda s, x: _cost(s.trajectory(x))  # noqa: E731
        return loss(system, x0), eqx.filter_grad(loss)(system, x0), jax.grad(loss, 1)(system, x0)

    direction = random_like(getkey(), (conv.kernel, conv.bias))
    for first, x0 in ((shared, x.reshape(3, -1)), (conv, x)):
        if first is conv:
            system = adjoint.Multistage([conv, _Flatten(conv.out_shape), head])
        else:
            system = adjoint.Multistage([shared, head])
        value, gs, gx = loss_and_grads(system, x0)
        assert abs(value - plain(conv.kernel, conv.bias, x)) < 1e-12
        stage = gs.stages[0]
        if first is conv:
            g = (stage.kernel, stage.bias)
        else:
            g = (stage.u.reshape(conv.kernel.shape), stage.bias)
        assert tree_max_rel_error(g, (g_kernel, g_bias)) < 1e-12
        assert tree_max_rel_error(gx.reshape(g_x.shape), g_x) < 1e-12
        # and against central finite differences along a random direction
        fd = directional_fd(lambda p: plain(p[0], p[1], x), (conv.kernel, conv.bias), direction)
        assert abs(tree_vdot(g, direction) - fd) < 1e-6 * max(1.0, abs(fd))


class _Flatten(adjoint.AbstractStage):
    shape: tuple[int, ...] = eqx.field(static=True)

    @property
    def in_shape(self):
        return self.shape

    def __call__(self, x):
        return x.reshape(-1)


def test_shared_dense_fixed_zeros_and_sums(getkey):
    index = np.array([[0, 1, -1, 2], [2, -1, 0, 0], [-1, -1, 1, 3]])
    stage = adjoint.SharedDense(index, jax.random.normal(getkey(), (4,)), jnp.zeros(3))
    w = stage.weight()
    assert jnp.all(w[index < 0] == 0)
    assert jnp.all(w[index >= 0] == stage.u[index[index >= 0]])
    x = jax.random.normal(getkey(), (5, 4))
    system = adjoint.Multistage([stage, adjoint.Dense(3, 2, "sigmoid", key=getkey())])
    rec = _costates(system, x, _cost)

    # ∂u_q = Σ over the weights that share u_q of ∂C/∂w_ij (untied reference).
    def untied(weight):
        dense = eqx.tree_at(lambda d: d.weight, adjoint.Dense(4, 3, key=getkey()), weight)
        dense = eqx.tree_at(lambda d: d.bias, dense, stage.bias)
        return _cost((jax.vmap(system.stages[1])(jax.vmap(dense)(x)),))

    g_w = jax.grad(untied)(w)
    expected = np.zeros(4)
    for (i, j), q in np.ndenumerate(index):
        if q >= 0:
            expected[q] += g_w[i, j]
    assert tree_max_rel_error(rec.grads.stages[0].u, jnp.asarray(expected)) < 1e-12
    params, static = eqx.partition(system, eqx.is_inexact_array)
    v = random_like(getkey(), params)
    fd = directional_fd(jax.jit(lambda p: _cost(eqx.combine(p, static).trajectory(x))), params, v)
    assert abs(tree_vdot(rec.grads, v) - fd) < 1e-7 * max(1.0, abs(fd))


def _low_rank(controls):
    a, b = controls
    return a @ b.T


def test_transformed_stage_user_map(getkey):
    controls = (jax.random.normal(getkey(), (4, 2)), jax.random.normal(getkey(), (5, 2)))
    stage = adjoint.Transformed(_low_rank, controls, jnp.ones(4) * 0.1, activation=jnp.sin)
    assert stage.in_shape == (5,) and stage.out_shape == (4,)
    system = adjoint.Multistage([stage, adjoint.Dense(4, 3, key=getkey())])
    x = jax.random.normal(getkey(), (6, 5))
    rec = _costates(system, x, _cost)
    ref = eqx.tree_at(lambda s: s.adjoint, system, adjoint.AutodiffAdjoint())
    params, static = eqx.partition(ref, eqx.is_inexact_array)
    loss = jax.jit(lambda p: _cost(eqx.combine(p, static).trajectory(x)))
    assert tree_max_rel_error(rec.grads, jax.grad(loss)(params)) < 1e-12
    v = random_like(getkey(), params)
    fd = directional_fd(loss, params, v)
    assert abs(tree_vdot(rec.grads, v) - fd) < 1e-7 * max(1.0, abs(fd))
    kkt = adjoint.kkt_residuals(system, x, rec.states, rec.costates, _cost)
    assert float(jnp.max(kkt.backward_norms)) < 1e-12
    assert float(jnp.max(kkt.forward_norms)) == 0.0


def test_stacked_shared_dense_and_kkt(getkey):
    groups = adjoint.symmetric_index(4)
    assert groups.num_weights == 10
    stages = [adjoint.SharedDense.random(groups, key=getkey()) for _ in range(3)]
    for s in stages:
        assert jnp.array_equal(s.weight(), s.weight().T)
    system = adjoint.Multistage.stack(stages)
    x = jax.random.normal(getkey(), (5, 4))
    rec = _costates(system, x, _cost)
    ref = eqx.tree_at(lambda s: s.adjoint, system, adjoint.AutodiffAdjoint())
    params, static = eqx.partition(ref, eqx.is_inexact_array)
    loss = jax.jit(lambda p: _cost(eqx.combine(p, static).trajectory(x)))
    assert tree_max_rel_error(rec.grads, jax.grad(loss)(params)) < 1e-12
    v = random_like(getkey(), params)
    fd = directional_fd(loss, params, v)
    assert abs(tree_vdot(rec.grads, v) - fd) < 1e-7 * max(1.0, abs(fd))
    kkt = adjoint.kkt_residuals(system, x, rec.states, rec.costates, _cost)
    assert float(jnp.max(kkt.backward_norms)) < 1e-12
    assert tree_max_rel_error(kkt.optimality.stages.u, rec.grads.stages.u) < 1e-12


def test_conv_kkt_and_float32_jit_vmap(getkey):
    convs = [
        adjoint.Conv((2, 6, 6), 2, 3, padding="SAME", activation="relu", key=getkey())
        for _ in range(3)
    ]
    system = adjoint.Multistage.stack(convs)  # stacked: lax.scan, and kkt_residuals jits
    x = jax.random.normal(getkey(), (4, 2, 6, 6))
    rec = _costates(system, x, _cost)
    kkt = eqx.filter_jit(adjoint.kkt_residuals)(system, x, rec.states, rec.costates, _cost)
    assert float(jnp.max(kkt.backward_norms)) < 1e-12
    assert tree_max_rel_error(kkt.optimality.stages.kernel, rec.grads.stages.kernel) < 1e-12
    # float32 under jit and vmap(grad) over two data sets agrees with float64.
    sys32 = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, system
    )
    xs = jnp.stack([x, 2 * x])
    grad = eqx.filter_jit(eqx.filter_grad(lambda s, x0: _cost(s.trajectory(x0))))
    g32 = jax.vmap(grad, in_axes=(None, 0))(sys32, xs.astype(jnp.float32))
    assert g32.stages.kernel.dtype == jnp.float32
    for i, scale in enumerate((1, 2)):
        g64 = _costates(system, scale * x, _cost).grads.stages.kernel
        assert tree_max_rel_error(g32.stages.kernel[i], g64) < 1e-4


def test_tie_multipliers(getkey):
    imap = adjoint.conv_index((1, 6), 2, 3, padding=1)
    stage = adjoint.SharedDense.random(imap, key=getkey())
    head = adjoint.Dense(12, 2, key=getkey())
    system = adjoint.Multistage([stage, head])
    x = jax.random.normal(getkey(), (7, 6))
    rec = _costates(system, x, _cost)
    tm = adjoint.tie_multipliers(stage, x, rec.states[1], rec.costates[0])
    # M_ij = −∂C/∂w_ij of the untied dense stage with the same W.
    untied = eqx.tree_at(lambda d: d.weight, adjoint.Dense(6, 12, key=getkey()), stage.weight())
    untied = eqx.tree_at(lambda d: d.bias, untied, stage.bias_vector())
    g_w = jax.grad(
        lambda w: _cost((jax.vmap(head)(jax.vmap(eqx.tree_at(lambda d: d.weight, untied, w))(x)),))
    )(stage.weight())
    used = imap.weight_index >= 0
    assert tree_max_rel_error(tm.multipliers, jnp.where(used, -g_w, 0)) < 1e-12
    # Σ over a group = −dC/du_q (paper's sign); counts, spread, extremes per group.
    assert tree_max_rel_error(tm.total, -rec.grads.stages[0].u) < 1e-12
    m = np.asarray(tm.multipliers)
    for q in range(imap.num_weights):
        uses = m[imap.weight_index == q]
        assert tm.count[q] == len(uses) and len(uses) >= 5  # padding drops some uses
        np.testing.assert_allclose(tm.spread[q], uses.std(), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(tm.smallest[q], uses.min(), rtol=1e-12)
        np.testing.assert_allclose(tm.largest[q], uses.max(), rtol=1e-12)
        np.testing.assert_allclose(tm.coherence[q], abs(uses.sum()) / np.abs(uses).sum())
    assert jnp.all((tm.coherence >= 0) & (tm.coherence <= 1 + 1e-12))
    with pytest.raises(TypeError, match="SharedDense"):
        adjoint.tie_multipliers(head, x, rec.states[1], rec.costates[0])


def test_index_constructors():
    imap = adjoint.conv_index((1, 5), 1, 3)
    expected = np.array([[0, 1, 2, -1, -1], [-1, 0, 1, 2, -1], [-1, -1, 0, 1, 2]])
    np.testing.assert_array_equal(imap.weight_index, expected)
    assert imap.num_weights == 3 and imap.out_shape == (1, 3)
    tied = adjoint.tie_index(np.array([[7, -1], [7, 3]]))
    np.testing.assert_array_equal(tied.weight_index, [[1, -1], [1, 0]])
    assert tied.num_weights == 2
    sym = adjoint.symmetric_index(3)
    np.testing.assert_array_equal(sym.weight_index, sym.weight_index.T)
    assert len(np.unique(sym.weight_index)) == 6


def test_bad_input_errors(getkey):
    u = jnp.zeros(3)
    with pytest.raises(ValueError, match=r"index has entries in \[0, 3\].*3 controls"):
        adjoint.SharedDense(np.array([[0, 3]]), u)
    with pytest.raises(ValueError, match=r"index has entries in \[-2, 0\]"):
        adjoint.SharedDense(np.array([[0, -2]]), u)
    with pytest.raises(ValueError, match=r"index must be an \(out, in\) matrix.*\(3,\)"):
        adjoint.SharedDense(np.array([0, 1, 2]), u)
    with pytest.raises(TypeError, match="index must have an integer dtype, got float"):
        adjoint.SharedDense(np.array([[0.0, 1.0]]), u)
    with pytest.raises(ValueError, match="u must be a 1-D floating array"):
        adjoint.SharedDense(np.array([[0, 1]]), jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"bias has shape \(3,\).*expected \(1,\)"):
        adjoint.SharedDense(np.array([[0, 1]]), u, jnp.zeros(3))
    with pytest.raises(ValueError, match=r"bias_index has entries in \[5, 5\]"):
        adjoint.SharedDense(np.array([[0, 1]]), u, jnp.zeros(2), bias_index=np.array([5]))
    with pytest.raises(ValueError, match=r"kernel of size \(5, 5\).*spatial shape \(4, 6\)"):
        adjoint.conv_index((1, 4, 6), 2, 5)
    with pytest.raises(ValueError, match=r"Conv: a kernel of size \(7,\)"):
        adjoint.Conv((2, 5), 1, 7, padding=0, key=getkey())
    with pytest.raises(ValueError, match="stride must be a positive int"):
        adjoint.conv_index((1, 4, 6), 2, 2, stride=0)
    with pytest.raises(ValueError, match="padding needs 2 entries"):
        adjoint.conv_index((1, 4, 6), 2, 2, padding=(1, 1, 1))
    with pytest.raises(ValueError, match=r"must return one floating \(out, in\) matrix"):
        adjoint.Transformed(lambda c: c, jnp.zeros(3))
    conv = adjoint.Conv((2, 5), 1, 3, key=getkey())
    with pytest.raises(ValueError, match=r"expects shape \(2, 5\)|cannot take a state"):
        adjoint.Multistage([adjoint.Dense(3, 4, key=getkey()), conv])


def test_bias_index_minus_one_is_a_fixed_zero(getkey):
    """bias_index −1 is a fixed zero bias, as index −1 is a fixed zero weight (not the
    last bias, as Python indexing would read it): value and gradient match a hand-written
    forward under jax.grad and finite differences."""
    index = np.array([[0, 1, -1], [1, -1, 2]])
    u, bias = jax.random.normal(getkey(), (3,)), jax.random.normal(getkey(), (2,))
    stage = adjoint.SharedDense(index, u, bias, bias_index=np.array([0, -1]))
    x = jax.random.normal(getkey(), (4, 3))

    def plain(u, bias):
        w = jnp.stack([jnp.stack([u[0], u[1], 0.0]), jnp.stack([u[1], 0.0, u[2]])])
        return _cost((jnp.tanh(x @ w.T + jnp.stack([bias[0], 0.0])),))

    rec = _costates(adjoint.Multistage([stage]), x, _cost)
    assert float(rec.value) == pytest.approx(float(plain(u, bias)), rel=1e-14)
    g_u, g_bias = jax.grad(plain, argnums=(0, 1))(u, bias)
    assert tree_max_rel_error(rec.grads.stages[0].u, g_u) < 1e-12
    assert tree_max_rel_error(rec.grads.stages[0].bias, g_bias) < 1e-12
    assert float(rec.grads.stages[0].bias[1]) == 0.0  # the last bias is not used
    fd = finite_difference_grad(lambda b: plain(u, b), bias)
    assert tree_max_rel_error(rec.grads.stages[0].bias, fd) < 1e-8


def test_index_maps_are_range_checked(getkey):
    u = jnp.zeros(3)
    with pytest.raises(ValueError, match=r"SharedDense: index .* entry 5 at \(1, 0\)"):
        adjoint.SharedDense(np.array([[0, 1], [5, -1]]), u)
    with pytest.raises(ValueError, match=r"SharedDense: bias_index .* entry -2 at \(0,\)"):
        adjoint.SharedDense(np.array([[0, 1]]), u, jnp.zeros(2), bias_index=np.array([-2]))

    # Built under jit the indices are traced: an entry out of range raises when the
    # stage runs (a gather out of range would be clamped and read a wrong control).
    @eqx.filter_jit
    def run(index, bias_index):
        stage = adjoint.SharedDense(index, u, jnp.ones(2), bias_index=bias_index)
        return jax.vmap(stage)(jnp.ones((2, 2)))

    ok = run(jnp.array([[0, -1]]), jnp.array([-1]))
    assert jnp.array_equal(ok, jnp.zeros((2, 1)))
    with pytest.raises(eqx.EquinoxRuntimeError, match="SharedDense: index has an entry out"):
        run(jnp.array([[0, 5]]), jnp.array([0])).block_until_ready()
    with pytest.raises(eqx.EquinoxRuntimeError, match="SharedDense: bias_index has an entry"):
        run(jnp.array([[0, 1]]), jnp.array([2])).block_until_ready()
