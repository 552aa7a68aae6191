"""Data parallelism: on 4 emulated CPU devices the sharded gradient and a few `fit` steps
equal the single-device result, and the arrays really are sharded."""

import json
import os
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

import adjoint


SCRIPT = textwrap.dedent(
    """
    import json
    import equinox as eqx, jax, jax.numpy as jnp, jax.tree_util as jtu, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    import adjoint

    def rel(a, b):
        la = jtu.tree_leaves(eqx.filter(a, eqx.is_inexact_array))
        lb = jtu.tree_leaves(eqx.filter(b, eqx.is_inexact_array))
        d = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb))
        return d / max(float(jnp.max(jnp.abs(y))) for y in lb)

    out = {"n_devices": len(jax.devices())}
    keys = jax.random.split(jax.random.key(0), 4)
    model = adjoint.Multistage([adjoint.Dense(3, 8, key=keys[0]), adjoint.Dense(8, 8, key=keys[1]),
                                adjoint.Dense(8, 2, key=keys[2])])
    x = jax.random.normal(keys[3], (64, 3))
    data = (x, jnp.tanh(x[:, :2] * x[:, 1:]))

    def loss(m, batch):
        xb, yb = batch
        return jnp.mean((m(xb) - yb) ** 2)

    params, static = eqx.partition(model, eqx.is_inexact_array)
    grad = jax.jit(jax.grad(lambda p, b: loss(eqx.combine(p, static), b)))
    single = grad(params, data)

    dp = adjoint.DataParallel()
    p_rep, d_sh = dp.replicate(params), dp.shard(data)
    sharded = grad(p_rep, d_sh)
    out["grad_rel_error"] = rel(sharded, single)
    out["data_devices"] = len(d_sh[0].sharding.device_set)
    out["data_shard_shapes"] = [list(s.data.shape) for s in d_sh[0].addressable_shards]
    out["grad_replicated"] = all(g.sharding.is_fully_replicated and len(g.sharding.device_set) == 4
                                 for g in jtu.tree_leaves(sharded))
    hlo = grad.lower(p_rep, d_sh).compile().as_text()
    out["grad_all_reduce"] = "all-reduce" in hlo

    kw = dict(steps=6, batch_size=16, key=jax.random.key(1), steps_per_dispatch=4, progress=False)
    a = adjoint.fit(model, loss, data, optax.adam(1e-2), **kw)
    b = adjoint.fit(model, loss, data, optax.adam(1e-2), parallel=dp, **kw)
    out["fit_rel_error"] = rel(b.model, a.model)
    out["fit_loss_max_diff"] = float(np.max(np.abs(a.history["loss"] - b.history["loss"])))
    leaves = jtu.tree_leaves(eqx.filter(b.model, eqx.is_inexact_array))
    out["fit_params_on_devices"] = min(len(p.sharding.device_set) for p in leaves)
    out["fit_params_replicated"] = all(p.sharding.is_fully_replicated for p in leaves)
    # inside fit's compiled loop, the minibatch the loss sees is split over the 4 devices
    seen = []

    def spy_loss(m, batch):
        jax.debug.inspect_array_sharding(batch[0], callback=lambda s: seen.append(s))
        return loss(m, batch)

    adjoint.fit(model, spy_loss, data, optax.adam(1e-2), parallel=dp, **dict(kw, steps=2))
    out["batch_in_loop_devices"] = len(seen[-1].device_set)
    out["batch_in_loop_shard_shape"] = list(seen[-1].shard_shape((16, 3)))
    try:
        adjoint.fit(model, loss, data, optax.adam(1e-2), **dict(kw, batch_size=6), parallel=dp)
        out["bad_batch_error"] = None
    except ValueError as err:
        out["bad_batch_error"] = str(err)
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def four_devices():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def test_sharded_gradient_equals_single_device(four_devices):
    r = four_devices
    assert r["n_devices"] == 4
    assert r["grad_rel_error"] < 1e-13
    assert r["data_devices"] == 4 and r["data_shard_shapes"] == [[16, 3]] * 4
    assert r["grad_replicated"] and r["grad_all_reduce"]


def test_sharded_fit_equals_single_device(four_devices):
    r = four_devices
    assert r["fit_rel_error"] < 1e-12 and r["fit_loss_max_diff"] < 1e-13
    assert r["fit_params_on_devices"] == 4 and r["fit_params_replicated"]
    assert "multiple of the number of devices (4)" in r["bad_batch_error"]
    assert r["batch_in_loop_devices"] == 4 and r["batch_in_loop_shard_shape"] == [4, 3]


def test_data_parallel_on_one_device_is_plain_fit(getkey):
    """The same code on one device: DataParallel changes nothing."""
    keys = jax.random.split(getkey(), 2)
    model = adjoint.Multistage([adjoint.Dense(2, 4, key=keys[0]), adjoint.Dense(4, 1, key=keys[1])])
    data = adjoint.datasets.parity(2)

    def loss(m, b):
        return jnp.mean((m(b[0]) - b[1]) ** 2)

    kw = dict(steps=5, batch_size=2, key=getkey(), progress=False)
    a = adjoint.fit(model, loss, data, optax.sgd(0.1), **kw)
    b = adjoint.fit(model, loss, data, optax.sgd(0.1), parallel=adjoint.DataParallel(), **kw)
    for x, y in zip(
        jtu.tree_leaves(eqx.filter(a.model, eqx.is_array)),
        jtu.tree_leaves(eqx.filter(b.model, eqx.is_array)),
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_shard_rejects_indivisible_batch():
    dp = adjoint.DataParallel()
    assert dp.n_devices == len(jax.devices())
    with pytest.raises(ValueError, match="DataParallel: devices must not be empty"):
        adjoint.DataParallel([])
    if dp.n_devices == 1:
        x = dp.shard(np.ones((3, 2)))
        assert x.shape == (3, 2) and len(x.sharding.device_set) == 1
    with pytest.raises(ValueError, match="leading .pattern. axis"):
        dp.shard(np.ones(()))
