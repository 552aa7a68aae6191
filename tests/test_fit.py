"""`adjoint.fit`: the compiled training loop against hand-written loops, NaN stop, hooks."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

import adjoint
from adjoint._fit import epoch_permutation

from .helpers import tree_max_rel_error


def _mlp(key, sizes=(2, 6, 1), **kwargs):
    keys = jax.random.split(key, len(sizes) - 1)
    stages = [adjoint.Dense(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys)]
    return adjoint.Multistage(stages, **kwargs)


def _mse(model, batch):
    x, y = batch
    return jnp.mean((model(x) - y) ** 2)


def _controls(model):
    return jtu.tree_leaves(eqx.filter(model, eqx.is_inexact_array))


def _hand_loop(model, data, optimizer, steps, batch_size, key):
    """The plain jax.grad + optax loop, minibatches in fit's documented order:
    epoch e uses epoch_permutation(key, e, P), sliced in order."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt_state = optimizer.init(params)
    n = jtu.tree_leaves(data)[0].shape[0]
    per_epoch = n // batch_size

    @jax.jit
    def step(params, opt_state, batch):
        value, grads = jax.value_and_grad(lambda p: _mse(eqx.combine(p, static), batch))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, value

    losses = []
    for s in range(steps):
        e, i = divmod(s, per_epoch)
        perm = epoch_permutation(key, e, n)
        idx = perm[i * batch_size : (i + 1) * batch_size]
        batch = jtu.tree_map(lambda x: x[idx], data)
        params, opt_state, value = step(params, opt_state, batch)
        losses.append(float(value))
    return eqx.combine(params, static), np.asarray(losses)


@pytest.mark.standard_promotion  # the hand-written reference loop calls optax's Adam directly
def test_fit_matches_hand_written_loop_minibatch(getkey):
    model = _mlp(getkey(), (2, 5, 1))
    data = adjoint.datasets.spirals(24, key=getkey())
    key = jax.random.key(3)
    opt = optax.adam(1e-2)
    res = adjoint.fit(model, _mse, data, opt, steps=13, batch_size=8, key=key, progress=False)
    ref, ref_losses = _hand_loop(model, data, opt, 13, 8, key)
    assert res.num_steps == 13 and res.result == adjoint.RESULTS.successful
    assert tree_max_rel_error(_controls(res.model), _controls(ref)) < 1e-12
    np.testing.assert_allclose(res.history["loss"], ref_losses, rtol=1e-12)
    np.testing.assert_array_equal(res.history["step"], np.arange(1, 14))


def test_fit_costate_equals_autodiff_and_stacked(getkey):
    key = getkey()
    data = adjoint.datasets.spirals(16, key=getkey())
    opt = optax.adam(3e-2)
    kw = dict(steps=10, batch_size=4, key=getkey(), progress=False)
    a = adjoint.fit(_mlp(key, (2, 4, 4, 1)), _mse, data, opt, **kw)
    b = adjoint.fit(
        _mlp(key, (2, 4, 4, 1), adjoint=adjoint.AutodiffAdjoint()), _mse, data, opt, **kw
    )
    assert tree_max_rel_error(_controls(a.model), _controls(b.model)) < 1e-12

    # stacked layout (lax.scan over stages) and a non-Multistage Equinox model train too
    keys = jax.random.split(getkey(), 3)
    stacked = adjoint.Multistage.stack([adjoint.Dense(2, 2, key=k) for k in keys])
    r = adjoint.fit(stacked, _mse, (data[0], jnp.repeat(data[1], 2, axis=1)), opt, **kw)
    assert r.model.stacked and np.isfinite(r.history["loss"]).all()
    mlp = eqx.nn.MLP(2, 1, 4, 1, key=getkey())
    r = adjoint.fit(mlp, lambda m, b: _mse(jax.vmap(m), b), data, opt, **kw)
    assert not any(np.array_equal(a, b) for a, b in zip(_controls(r.model), _controls(mlp)))


def test_fit_chunking_does_not_change_result(getkey):
    model = _mlp(getkey(), (2, 4, 1))
    data = adjoint.datasets.spirals(20, key=getkey())
    kw = dict(steps=17, batch_size=5, key=getkey(), progress=False)
    a = adjoint.fit(model, _mse, data, optax.adam(1e-2), steps_per_dispatch=17, **kw)
    b = adjoint.fit(model, _mse, data, optax.adam(1e-2), steps_per_dispatch=3, **kw)
    assert tree_max_rel_error(_controls(a.model), _controls(b.model)) < 1e-12


def test_fit_learns_xor(getkey):
    x, y = adjoint.datasets.parity(2)
    model = _mlp(getkey(), (2, 4, 1))
    res = adjoint.fit(
        model, _mse, (x, y), optax.adam(0.05), steps=300, key=getkey(), progress=False
    )
    assert res.history["loss"][-1] < 0.01 * res.history["loss"][0]
    assert jnp.all(jnp.sign(res.model(x)) == y)


def test_fit_float32(getkey):
    x, y = adjoint.datasets.parity(3, dtype=jnp.float32)
    keys = jax.random.split(getkey(), 2)
    model = adjoint.Multistage(
        [
            adjoint.Dense(3, 8, dtype=jnp.float32, key=keys[0]),
            adjoint.Dense(8, 1, dtype=jnp.float32, key=keys[1]),
        ]
    )
    res = adjoint.fit(
        model, _mse, (x, y), optax.adam(0.05), steps=50, batch_size=4, key=getkey(), progress=False
    )
    assert res.history["loss"].dtype == np.float32
    assert all(p.dtype == jnp.float32 for p in _controls(res.model))


class _Scalar(eqx.Module):
    w: jax.Array


def _sqrt_loss(model, batch):
    # d/dw (w + √w) > 0: steepest descent drives w below 0, where √w is NaN.
    return model.w + jnp.sqrt(model.w) + 0 * jnp.sum(batch)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, getkey):
    data = jnp.zeros((4, 1))
    model = _Scalar(jnp.asarray(1.0))
    kw = dict(steps=40, key=getkey(), steps_per_dispatch=2, checkpoint_every=2, progress=False)
    with pytest.raises(adjoint.NonFiniteLossError, match="non-finite .* at step 7") as info:
        adjoint.fit(model, _sqrt_loss, data, optax.sgd(0.1), checkpoint_dir=tmp_path, **kw)
    assert "ckpt-0000000006.adj" in str(info.value)
    like = {
        "params": eqx.filter(model, eqx.is_inexact_array),
        "opt_state": optax.sgd(0.1).init(model),
        "step": np.zeros((), np.int64),
        "key": jax.random.key_data(jax.random.key(0)),
    }
    ckpt = adjoint.latest_checkpoint(tmp_path, like)
    assert ckpt.step == 6 and np.isfinite(ckpt.state["params"].w)

    with pytest.warns(UserWarning, match="non-finite"):
        res = adjoint.fit(model, _sqrt_loss, data, optax.sgd(0.1), throw=False, **kw)
    assert res.result == adjoint.RESULTS.nonfinite and res.num_steps == 6
    with pytest.warns(DeprecationWarning):
        assert res.stop_reason == "non-finite loss" and res.step == 6  # old names
    assert np.isfinite(res.model.w) and len(res.history["loss"]) == 6


def test_eval_and_log_hooks(getkey, capsys):
    x, y = adjoint.datasets.parity(2)
    model = _mlp(getkey(), (2, 3, 1))
    logged = []
    res = adjoint.fit(
        model,
        _mse,
        (x, y),
        optax.adam(0.05),
        steps=10,
        key=getkey(),
        steps_per_dispatch=4,
        eval_fn=lambda m: {"mse": _mse(m, (x, y)), "acc": jnp.mean(jnp.sign(m(x)) == y)},
        eval_every=5,
        log=lambda s, m: logged.append((s, m)),
        progress=True,
    )
    np.testing.assert_array_equal(res.history["eval_step"], [5, 10])
    np.testing.assert_allclose(res.history["eval_mse"][-1], _mse(res.model, (x, y)), rtol=1e-12)
    assert [s for s, _ in logged] == [5, 10]
    np.testing.assert_allclose(logged[0][1]["loss"], np.mean(res.history["loss"][:5]))
    assert "fit" in capsys.readouterr().err  # tqdm's bar, forced on


def test_fit_argument_errors(getkey):
    x, y = adjoint.datasets.parity(2)
    model = _mlp(getkey(), (2, 3, 1))
    opt = optax.sgd(0.1)
    with pytest.raises(ValueError, match="batch_size must be an int in 1..4"):
        adjoint.fit(model, _mse, (x, y), opt, steps=1, batch_size=5, key=getkey())
    with pytest.raises(ValueError, match="same number of patterns"):
        adjoint.fit(model, _mse, (x, y[:3]), opt, steps=1, key=getkey())
    with pytest.raises(ValueError, match="loss must return a scalar"):
        adjoint.fit(model, lambda m, b: m(b[0]), (x, y), opt, steps=1, key=getkey())
    with pytest.raises(ValueError, match="loss\\(model, batch\\) failed"):
        adjoint.fit(model, lambda m, b: m(b[0][:, :1]).sum(), (x, y), opt, steps=1, key=getkey())
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        adjoint.fit(model, _mse, (x, y), "adam", steps=1, key=getkey())
    with pytest.raises(ValueError, match="steps must be"):
        adjoint.fit(model, _mse, (x, y), opt, steps=-1, key=getkey())


def _system(kind, key):
    """One tiny system of each kind in the package, with a loss on (inputs, targets)."""
    k1, k2 = jax.random.split(key)
    if kind == "multistage":
        return _mlp(key, (3, 4, 1)), _mse
    if kind == "shared":
        index = jnp.asarray([[0, 1, -1], [-1, 0, 1], [2, -1, 0]])  # tied weights, zeros
        model = adjoint.Multistage(
            [adjoint.SharedDense.random(index, key=k1), adjoint.Dense(3, 1, key=k2)]
        )
        return model, _mse
    if kind == "recurrent":
        model = adjoint.RecurrentNet(adjoint.ElmanCell(3, 4, key=k1))

        def loss(net, batch):
            x, y = batch
            h = net(jnp.zeros(4), jnp.stack([x, -x]))  # T = 2 steps, (T, P, m)
            return jnp.mean((h[:, :1] - y) ** 2)

        return model, loss
    if kind == "ctrnn":
        model = adjoint.CTRNN(
            3, forward=adjoint.FixedPointSolve(), adjoint=adjoint.LinearSolveAdjoint(), key=k1
        )
        return model, lambda m, b: jnp.mean((m(b[0])[:, :1] - b[1]) ** 2)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["multistage", "shared", "recurrent", "ctrnn"])
def test_fit_trains_every_system_kind(kind, getkey):
    """Full batch + optax.sgd(λ) is eq. 9, W ← W − λ dC/dW: fit's controls equal that
    recursion run with eqx.filter_grad (each system's own adjoint) step by step."""
    model, loss = _system(kind, getkey())
    x, _ = adjoint.datasets.parity(3)
    data = (0.5 * x, 0.5 * x[:, :1] * x[:, 1:2])
    lr = 0.1
    res = adjoint.fit(model, loss, data, optax.sgd(lr), steps=3, key=getkey(), progress=False)
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    w = model
    for _ in range(3):
        w = eqx.apply_updates(w, jtu.tree_map(lambda d: -lr * d, grad(w, data)))
    assert tree_max_rel_error(_controls(res.model), _controls(w)) < 1e-9
    assert res.history["loss"][-1] < res.history["loss"][0]


def test_fit_float16_model_with_float32_data(getkey):
    """Mixed dtypes: the costate VJP returns float16 gradients for float16 controls, so
    the compiled loop keeps its carry types and the model stays float16."""
    keys = jax.random.split(getkey(), 2)
    model = adjoint.Multistage(
        [
            adjoint.Dense(3, 4, dtype=jnp.float16, key=keys[0]),
            adjoint.Dense(4, 1, dtype=jnp.float16, key=keys[1]),
        ]
    )
    x, y = adjoint.datasets.parity(3, dtype=jnp.float32)
    res = adjoint.fit(model, _mse, (x, y), optax.adam(0.05), steps=20, key=getkey(), progress=False)
    assert all(p.dtype == jnp.float16 for p in _controls(res.model))
    assert np.isfinite(res.history["loss"]).all()
    assert res.history["loss"][-1] < res.history["loss"][0]


def test_fit_refuses_an_optimiser_that_changes_its_state_dtype(getkey):
    def init(params):
        return jtu.tree_map(jnp.zeros_like, params)  # float16, like the controls

    def update(grads, state, params=None):
        state = jtu.tree_map(lambda s, g: s + g.astype(jnp.float32), state, grads)
        return jtu.tree_map(lambda s: -0.1 * s, state), state

    model = _mlp(getkey(), (2, 3, 1))
    model = jtu.tree_map(lambda a: a.astype(jnp.float16) if eqx.is_inexact_array(a) else a, model)
    x, y = adjoint.datasets.parity(2, dtype=jnp.float16)
    opt = optax.GradientTransformation(init, update)
    with pytest.raises(TypeError, match=r"changes the dtype of its state .* float16 to float32"):
        adjoint.fit(model, _mse, (x, y), opt, steps=2, key=getkey(), progress=False)
