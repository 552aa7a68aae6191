"""Residual stages, skip connections and time-unfolded recurrent networks."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import adjoint

from .helpers import directional_fd, random_like, tree_max_rel_error, tree_vdot


# --------------------------------------------------------------------------------------
# Recurrent networks
# --------------------------------------------------------------------------------------


_costates = eqx.filter_jit(adjoint.costates)  # one compile instead of op-by-op


def _plain_states(cell, h0, xs):
    """The reference: H(t) = tanh(W H(t-1) + V I(t) + b) with a plain lax.scan."""

    def step(h, x):
        h = jnp.tanh(h @ cell.weight_hh.T + x @ cell.weight_ih.T + cell.bias)
        return h, h

    _, hs = jax.lax.scan(step, h0, xs)
    return jnp.concatenate([jnp.broadcast_to(h0, hs.shape[1:])[None], hs])


_WEIGHTS = jnp.arange(8.0)[:, None, None]


def _traj_cost(hs):  # a cost on every step's state
    return jnp.sum(_WEIGHTS * (hs - 0.2) ** 2)


def _final_cost(h):
    return jnp.sum(jnp.sin(3 * h))


@pytest.fixture
def rnn(getkey):
    cell = adjoint.ElmanCell(3, 5, key=getkey())
    return cell, jax.random.normal(getkey(), (4, 5)), jax.random.normal(getkey(), (7, 4, 3))


@pytest.mark.parametrize("every", [None, 1, 3, 7, 10])  # T = 7: 1, 7 divide it, 3 does not
def test_recurrent_gradients_match_plain_scan(rnn, every):
    cell, h0, xs = rnn
    ref_final = jax.grad(lambda a: _final_cost(_plain_states(*a)[-1]))((cell, h0, xs))
    ref_traj = jax.grad(lambda a: _traj_cost(_plain_states(*a)))((cell, h0, xs))
    for adj in (adjoint.CostateAdjoint(), adjoint.AutodiffAdjoint()):
        net = adjoint.RecurrentNet(cell, checkpoint_every=every, adjoint=adj)
        grad = eqx.filter_jit(eqx.filter_grad(lambda a: _final_cost(a[0](a[1], a[2]))))
        g = grad((net, h0, xs))
        assert tree_max_rel_error((g[0].cell, g[1], g[2]), ref_final) < 1e-12
    if every is None:  # the trajectory form stores every state: test it once
        net = adjoint.RecurrentNet(cell)
        grad = eqx.filter_jit(eqx.filter_grad(lambda a: _traj_cost(a[0].trajectory(a[1], a[2]))))
        g = grad((net, h0, xs))
        assert tree_max_rel_error((g[0].cell, g[1], g[2]), ref_traj) < 1e-12


def test_recurrent_finite_differences_single_pattern(getkey):
    cell = adjoint.ElmanCell(2, 3, activation="sigmoid", key=getkey())
    net = adjoint.RecurrentNet(cell, length=6, checkpoint_every=4)
    h0 = jax.random.normal(getkey(), (3,))
    xs = jax.random.normal(getkey(), (6, 2))
    assert net(h0, xs).shape == (3,) and net.trajectory(h0, xs).shape == (7, 3)
    params, static = eqx.partition(net, eqx.is_inexact_array)

    def loss(p):
        return jnp.sum(jnp.cos(eqx.combine(p, static)(h0, xs)))

    g = jax.jit(jax.grad(loss))(params)
    v = random_like(getkey(), params)
    fd = directional_fd(jax.jit(loss), params, v)
    assert abs(tree_vdot(g, v) - fd) < 1e-7 * max(1.0, abs(fd))


class _GatedCell(adjoint.AbstractCell):
    """A user cell without an analytic adjoint: the default costate is jax.vjp."""

    w: jax.Array
    v: jax.Array

    @property
    def hidden_size(self):
        return self.w.shape[0]

    def __call__(self, h, x):
        gate = jax.nn.sigmoid(self.v @ x)
        return gate * h + (1 - gate) * jnp.tanh(self.w @ h + x.sum())


def test_user_cell_default_costate(getkey):
    cell = _GatedCell(jax.random.normal(getkey(), (3, 3)), jax.random.normal(getkey(), (3, 2)))
    h0, xs = jax.random.normal(getkey(), (2, 3)), jax.random.normal(getkey(), (5, 2, 2))
    net = adjoint.RecurrentNet(cell, checkpoint_every=2)
    ref = adjoint.RecurrentNet(cell, adjoint=adjoint.AutodiffAdjoint())
    g = eqx.filter_grad(lambda a: _final_cost(a[0](a[1], a[2])))((net, h0, xs))
    r = eqx.filter_grad(lambda a: _final_cost(a[0](a[1], a[2])))((ref, h0, xs))
    assert tree_max_rel_error((g[0].cell, g[1], g[2]), (r[0].cell, r[1], r[2])) < 1e-12


def test_recurrent_unfolded_kkt_and_tied_gradient(rnn):
    cell, h0, xs = rnn
    net = adjoint.RecurrentNet(cell)
    with pytest.warns(DeprecationWarning, match="RecurrentNet.unfold is deprecated"):
        system, z0 = net.unfold(h0, xs)
    assert system.n_stages == 7

    def cost(zs):
        with pytest.warns(DeprecationWarning, match="unfolded_states is deprecated"):
            return _traj_cost(net.unfolded_states(zs))

    rec = _costates(system, z0, cost)
    with pytest.warns(DeprecationWarning, match="unfolded_states is deprecated"):
        h = net.unfolded_states(rec.states)
    assert tree_max_rel_error(h, net.trajectory(h0, xs)) < 1e-14
    kkt = adjoint.kkt_residuals(system, z0, rec.states, rec.costates, cost)
    assert float(jnp.max(kkt.forward_norms)) == 0.0
    assert float(jnp.max(kkt.backward_norms)) < 1e-12
    # The shared controls' gradient is the sum of the per-step ones (equality constraints).
    g = eqx.filter_grad(lambda c: _traj_cost(adjoint.RecurrentNet(c).trajectory(h0, xs)))(cell)
    with pytest.warns(DeprecationWarning, match="tied_gradient is deprecated"):
        assert tree_max_rel_error(net.tied_gradient(rec.grads), g) < 1e-12
        assert tree_max_rel_error(net.tied_gradient(kkt.optimality), g) < 1e-12
    with pytest.warns(DeprecationWarning, match="UnfoldedStep is deprecated"):
        adjoint.UnfoldedStep(cell, jnp.asarray(0), 5, 7, 3)


def test_recurrent_multistage_shares_the_cell(rnn):
    """The net is a stacked Multistage whose cell is shared: `costates` on it gives
    dC/dW summed over t, dC/dI(t) per step, and B(t) = −dC/dH(t)."""
    cell, h0, xs = rnn
    net = adjoint.RecurrentNet(cell)
    system, x0 = net.multistage(h0, xs)
    assert system.n_stages == 7 and x0.shape == (1, 4, 5)
    assert system.stages.cell.weight_hh.shape == (5, 5)  # one copy, not T
    rec = _costates(system, x0, lambda hs: _traj_cost(hs[:, 0]))
    ref_cell, ref_h0, ref_xs = jax.grad(lambda a: _traj_cost(_plain_states(*a)))((cell, h0, xs))
    assert tree_max_rel_error(rec.grads.stages.cell, ref_cell) < 1e-12
    assert tree_max_rel_error(rec.grads.stages.inputs, ref_xs) < 1e-12
    assert tree_max_rel_error(-rec.initial_costate[0], ref_h0) < 1e-12
    assert tree_max_rel_error(rec.states[:, 0], _plain_states(cell, h0, xs)) < 1e-14


def test_recurrent_float32_vmap(rnn):
    cell, h0, xs = rnn
    to32 = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, t
    )
    net = adjoint.RecurrentNet(to32(cell), checkpoint_every=3)
    grad = eqx.filter_jit(eqx.filter_grad(lambda n, x: _final_cost(n(to32(h0), x))))
    batch = jnp.stack([xs, -xs]).astype(jnp.float32)
    g32 = jax.vmap(grad, in_axes=(None, 0))(net, batch)
    assert g32.cell.weight_hh.dtype == jnp.float32 and g32.cell.weight_hh.shape == (2, 5, 5)
    ref = jax.grad(lambda c, x: _final_cost(_plain_states(c, h0, x)[-1]))(cell, -xs)
    assert tree_max_rel_error(g32.cell.weight_hh[1], ref.weight_hh) < 1e-4


@pytest.mark.standard_promotion  # the plain-scan reference mixes float16 weights, float32 states
@pytest.mark.parametrize("every", [None, 3])
def test_recurrent_mixed_dtypes(rnn, every):
    """A float16 cell on float32 states and inputs: the custom VJP sums the per-step
    control gradients in each control's own dtype, as jax.grad of the plain scan does."""
    cell, h0, xs = rnn
    to16 = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda a: a.astype(jnp.float16) if eqx.is_inexact_array(a) else a, t
    )
    h0, xs = h0.astype(jnp.float32), xs.astype(jnp.float32)
    net = adjoint.RecurrentNet(to16(cell), checkpoint_every=every)
    g = eqx.filter_jit(eqx.filter_grad(lambda a: _final_cost(a[0](a[1], a[2]))))((net, h0, xs))
    ref = jax.grad(lambda a: _final_cost(_plain_states(*a)[-1]))((to16(cell), h0, xs))
    assert all(a.dtype == jnp.float16 for a in jax.tree_util.tree_leaves(g[0].cell))
    assert g[1].dtype == g[2].dtype == jnp.float32
    assert all(a.dtype == jnp.float16 for a in jax.tree_util.tree_leaves(ref[0]))
    up = lambda t: jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), t)  # noqa: E731
    assert tree_max_rel_error(up(g[0].cell), up(ref[0])) < 1e-2


def test_recurrent_bad_input(rnn, getkey):
    cell, h0, xs = rnn
    with pytest.raises(ValueError, match=r"T = 7 steps \(shape \(7, 4, 3\)\).*length = 6"):
        adjoint.RecurrentNet(cell, length=6)(h0, xs)
    with pytest.raises(ValueError, match=r"2 features per step.*input_size = 3"):
        adjoint.RecurrentNet(cell)(h0, xs[..., :2])
    with pytest.raises(ValueError, match=r"h0 has 3 patterns \(shape \(3, 5\)\) but inputs has 4"):
        adjoint.RecurrentNet(cell)(h0[:3], xs)
    with pytest.raises(ValueError, match=r"T = 0 steps"):
        adjoint.RecurrentNet(cell)(h0, xs[:0])
    with pytest.raises(ValueError, match="checkpoint_every must be None or a positive int"):
        adjoint.RecurrentNet(cell, checkpoint_every=0)
    with pytest.raises(ValueError, match=r"h0 must be \(n,\) or \(P, n\) with n = 5"):
        adjoint.RecurrentNet(cell)(h0[:, :4], xs)


# --------------------------------------------------------------------------------------
# Residual stages and skip connections
# --------------------------------------------------------------------------------------


def _cost(states):
    return jnp.sum(jnp.sin(states[-1])) + 0.5 * jnp.sum(states[-1] ** 2)


def test_residual_stage(getkey):
    blocks = [adjoint.Residual(adjoint.Dense(4, 4, key=getkey())) for _ in range(3)]
    x = jax.random.normal(getkey(), (5, 4))
    tuple_layout = adjoint.Multistage(blocks)
    ref = eqx.tree_at(lambda s: s.adjoint, tuple_layout, adjoint.AutodiffAdjoint())
    grad = eqx.filter_grad(lambda s: _cost(s.trajectory(x)))
    assert tree_max_rel_error(grad(tuple_layout), grad(ref)) < 1e-12
    stacked = adjoint.Multistage.stack(blocks)
    check = adjoint.check_gradients(stacked, x, _cost)
    assert check.worst[0] < 1e-12 and check.worst[1] < 1e-6, check.table()
    for system in (tuple_layout, stacked):
        rec = _costates(system, x, _cost)
        kkt = adjoint.kkt_residuals(system, x, rec.states, rec.costates, _cost)
        assert float(jnp.max(kkt.backward_norms)) < 1e-12
    with pytest.raises(ValueError, match=r"maps \(4,\) to \(3,\)"):
        adjoint.Residual(adjoint.Dense(4, 3, key=getkey()))


def test_skip_network(getkey):
    dense = lambda i, o: adjoint.Dense(i, o, key=getkey())  # noqa: E731
    stages = [dense(3, 4), dense(4, 4), dense(7, 2), adjoint.Residual(dense(2, 2)), dense(10, 3)]
    reads = [0, 1, (2, 0), 3, (4, 1, 2)]  # X(3) reads X(2) and X(0); X(5) reads X(4), X(1), X(2)
    system = adjoint.skip_network(stages, reads, in_size=3)
    x0 = jax.random.normal(getkey(), (6, 3))

    def plain(stages, x0):  # the DAG written out by hand
        f = [jax.vmap(s) for s in stages]
        x1 = f[0](x0)
        x2 = f[1](x1)
        x3 = f[2](jnp.concatenate([x2, x0], -1))
        x4 = f[3](x3)
        return (x0, x1, x2, x3, x4, f[4](jnp.concatenate([x4, x1, x2], -1)))

    def plain_cost(xs):  # costs on X(5) and on an intermediate state X(2)
        return jnp.sum((xs[-1] - 0.3) ** 2) + jnp.sum(xs[2] ** 3)

    def cost(zs):
        return plain_cost(adjoint.skip_states(system, zs))

    states = adjoint.skip_states(system, system.trajectory(x0))
    assert tree_max_rel_error(states, plain(stages, x0)) < 1e-14
    rec = _costates(system, x0, cost)
    g, gx = jax.jit(jax.grad(lambda s, x: plain_cost(plain(s, x)), argnums=(0, 1)))(stages, x0)
    assert tree_max_rel_error([s.stage for s in rec.grads.stages], g) < 1e-12
    assert tree_max_rel_error(-rec.initial_costate, gx) < 1e-12
    # B(k) = −dC/dX(k): perturb each state and differentiate what follows.
    b = adjoint.skip_states(system, rec.costates)
    xs = plain(stages, x0)

    def downstream(x2):  # C as a function of X(2) alone (it feeds X(3) and X(5))
        f = [jax.vmap(s) for s in stages]
        x3 = f[2](jnp.concatenate([x2, x0], -1))
        x4 = f[3](x3)
        return plain_cost((x0, xs[1], x2, x3, x4, f[4](jnp.concatenate([x4, xs[1], x2], -1))))

    assert tree_max_rel_error(b[1], -jax.jit(jax.grad(downstream))(xs[2])) < 1e-12
    params, static = eqx.partition(system, eqx.is_inexact_array)
    loss = jax.jit(lambda p: cost(eqx.combine(p, static).trajectory(x0)))
    v = random_like(getkey(), params)
    fd = directional_fd(loss, params, v)
    assert abs(tree_vdot(rec.grads, v) - fd) < 1e-7 * max(1.0, abs(fd))
    kkt = adjoint.kkt_residuals(system, x0, rec.states, rec.costates, cost)
    assert float(jnp.max(kkt.backward_norms)) < 1e-12
    assert float(jnp.max(kkt.forward_norms)) == 0.0


def test_skip_network_bad_input(getkey):
    d = adjoint.Dense(3, 4, key=getkey())
    with pytest.raises(ValueError, match=r"stage 2 reads \(2,\); it may read only states 0..1"):
        adjoint.skip_network([d, adjoint.Dense(4, 4, key=getkey())], [0, 2])
    with pytest.raises(ValueError, match=r"stage 2 \(Dense\) expects shape \(4,\).*\(7,\)"):
        adjoint.skip_network([d, adjoint.Dense(4, 4, key=getkey())], [0, (1, 0)])
    with pytest.raises(ValueError, match="reads has 1 entries for 2 stages"):
        adjoint.skip_network([d, d], [0])
