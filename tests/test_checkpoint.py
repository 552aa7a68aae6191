"""Checkpoints: exact round trip, corruption detected and skipped, resume after SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

import adjoint


# One training problem, shared by this process and the subprocess that gets killed.
TASK = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, optax
    jax.config.update("jax_enable_x64", True)
    import adjoint

    def make():
        keys = jax.random.split(jax.random.key(42), 3)
        model = adjoint.Multistage([
            adjoint.Dense(2, 8, key=keys[0]), adjoint.Dense(8, 1, key=keys[1])
        ])
        data = adjoint.datasets.spirals(32, key=keys[2])

        def loss(m, batch):
            x, y = batch
            return jnp.mean((m(x) - y) ** 2)

        kwargs = dict(steps=300, batch_size=8, key=jax.random.key(7), steps_per_dispatch=10,
                      checkpoint_every=10, progress=False)
        return model, loss, data, optax.adam(1e-2), kwargs
    """
)


def _leaves(tree):
    return [np.asarray(x) for x in jtu.tree_leaves(eqx.filter(tree, eqx.is_array))]


def _assert_bit_identical(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.fixture
def task(tmp_path, monkeypatch):
    (tmp_path / "killtask.py").write_text(TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    import killtask

    yield killtask
    sys.modules.pop("killtask", None)


def _state(getkey):
    params = {"w": jax.random.normal(getkey(), (3, 2)), "b": jnp.arange(3.0, dtype=jnp.float32)}
    opt_state = optax.adam(1e-3).init(params)
    return {
        "params": params,
        "opt_state": opt_state,
        "step": np.asarray(5, np.int64),
        "key": jax.random.key_data(getkey()),
    }


def test_round_trip_is_exact(tmp_path, getkey):
    state = _state(getkey)
    path = adjoint.save_checkpoint(tmp_path, 5, state, {"note": "hi"})
    assert os.path.basename(path) == "ckpt-0000000005.adj"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    ck = adjoint.load_checkpoint(path, state)
    assert ck.step == 5 and ck.header["note"] == "hi"
    _assert_bit_identical(ck.state, state)
    # a template of ShapeDtypeStructs works too
    ck2 = adjoint.load_checkpoint(path, jax.eval_shape(lambda: state))
    _assert_bit_identical(ck2.state, state)


def test_corrupted_and_truncated_files_are_skipped(tmp_path, getkey):
    state = _state(getkey)
    newer = dict(state, step=np.asarray(9, np.int64))
    p5 = adjoint.save_checkpoint(tmp_path, 5, state)
    p9 = adjoint.save_checkpoint(tmp_path, 9, newer)
    p12 = adjoint.save_checkpoint(tmp_path, 12, newer)
    data = open(p12, "rb").read()
    open(p12, "wb").write(data[: len(data) // 2])  # truncated
    data = bytearray(open(p9, "rb").read())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    open(p9, "wb").write(bytes(data))
    (tmp_path / ".ckpt-x.tmp").write_bytes(b"half a write")  # left by a killed writer

    with pytest.raises(adjoint.CheckpointError, match="checksum"):
        adjoint.load_checkpoint(p9, state)
    with pytest.warns(UserWarning) as rec:
        ck = adjoint.latest_checkpoint(tmp_path, state)
    messages = [str(w.message) for w in rec]
    assert any(p12 in m for m in messages) and any(p9 in m for m in messages)
    assert ck.path == p5 and ck.step == 5
    _assert_bit_identical(ck.state, state)

    # a valid file that does not match the training state is rejected, not misread
    wrong = dict(state, params={"w": jnp.zeros((2, 2)), "b": state["params"]["b"]})
    with pytest.raises(adjoint.CheckpointError, match="does not match"):
        adjoint.load_checkpoint(p5, wrong)


def test_resume_falls_back_past_a_corrupted_checkpoint(tmp_path, task):
    model, loss, data, opt, kw = task.make()
    kw = dict(kw, steps=60)
    full = adjoint.fit(model, loss, data, opt, **kw)
    d = tmp_path / "ck"
    part = adjoint.fit(model, loss, data, opt, **dict(kw, steps=30), checkpoint_dir=d)
    assert part.checkpoint.endswith("ckpt-0000000030.adj")
    with open(part.checkpoint, "r+b") as f:
        f.truncate(100)
    with pytest.warns(UserWarning, match="ckpt-0000000030.adj"):
        res = adjoint.fit(model, loss, data, opt, **kw, checkpoint_dir=d)
    assert res.resumed_from == 20
    _assert_bit_identical(res.model, full.model)
    _assert_bit_identical(res.opt_state, full.opt_state)
    np.testing.assert_array_equal(res.history["loss"], full.history["loss"])


def test_resume_after_sigkill_is_bit_identical(tmp_path, task):
    """Kill a training process with SIGKILL mid-run, resume, compare with a clean run."""
    d = tmp_path / "ck"
    script = tmp_path / "train.py"
    script.write_text(
        TASK
        + textwrap.dedent(
            f"""
            import sys, time
            model, loss, data, opt, kw = make()
            # the sleep only slows the run down so that the kill lands mid-run
            adjoint.fit(model, loss, data, opt, **kw, checkpoint_dir={str(d)!r},
                        eval_fn=lambda m: time.sleep(0.05) or 0.0)
            print("finished", flush=True)
            """
        )
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if d.is_dir() and len([f for f in os.listdir(d) if f.endswith(".adj")]) >= 2:
                break
            time.sleep(0.02)
        time.sleep(0.13)  # land somewhere inside a later chunk or checkpoint write
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, err.decode()[-2000:])
    assert b"finished" not in out

    # whether or not the kill landed inside a write, leave a half-written file of the
    # dead writer's: the restart removes it, and no temporary file is left behind
    (d / f".ckpt-{proc.pid}@{_host()}-killed.tmp").write_bytes(b"half a write")
    model, loss, data, opt, kw = task.make()
    resumed = adjoint.fit(model, loss, data, opt, **kw, checkpoint_dir=d)
    assert resumed.resumed_from is not None and 0 < resumed.resumed_from < kw["steps"]
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]
    assert os.path.exists(resumed.checkpoint)
    clean = adjoint.fit(model, loss, data, opt, **kw)
    _assert_bit_identical(resumed.model, clean.model)
    _assert_bit_identical(resumed.opt_state, clean.opt_state)
    np.testing.assert_array_equal(resumed.history["loss"], clean.history["loss"])
    np.testing.assert_array_equal(resumed.history["step"], np.arange(1, kw["steps"] + 1))

    # resuming a finished run does no work and returns the same state
    again = adjoint.fit(model, loss, data, opt, **kw, checkpoint_dir=d)
    assert again.resumed_from == kw["steps"]
    _assert_bit_identical(again.model, clean.model)


def _host():
    from adjoint._checkpoint import _host_name

    return _host_name()


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_another_models_checkpoints_are_refused(tmp_path, task, getkey):
    """Another model's checkpoints at higher steps would win every prune: fit refuses the
    directory, naming them, and touches nothing."""
    d = tmp_path / "ck"
    other = _state(getkey)
    for step in (500, 600):
        adjoint.save_checkpoint(d, step, dict(other, step=np.asarray(step, np.int64)))
    before = sorted(os.listdir(d))
    model, loss, data, opt, kw = task.make()
    with pytest.raises(
        adjoint.CheckpointMismatchError, match=r"ckpt-0000000600.adj, ckpt-0000000500.adj"
    ):
        adjoint.fit(model, loss, data, opt, **dict(kw, steps=20), checkpoint_dir=d)
    assert sorted(os.listdir(d)) == before


def test_pruning_keeps_this_models_checkpoints(tmp_path, task, getkey):
    """A writer of another model appears mid-run at a higher step: pruning counts only
    this model's files, so the checkpoint just written survives and theirs too."""
    d = tmp_path / "ck"
    other = _state(getkey)
    foreign = str(d / "ckpt-0000000999.adj")

    def log(step, metrics):
        if step == 10:
            adjoint.save_checkpoint(d, 999, other)

    model, loss, data, opt, kw = task.make()
    kw = dict(kw, steps=40, checkpoint_every=10)
    res = adjoint.fit(model, loss, data, opt, **kw, checkpoint_dir=d, log=log, keep_checkpoints=1)
    assert os.path.exists(res.checkpoint) and res.checkpoint.endswith("ckpt-0000000040.adj")
    assert sorted(os.listdir(d)) == ["ckpt-0000000040.adj", "ckpt-0000000999.adj"]
    assert os.path.exists(foreign)


def test_only_stale_temporary_files_are_removed(tmp_path, getkey):
    """Pruning leaves temporary files alone; at the start, fit removes only those whose
    writer (pid on this host) is gone, never another writer's in-flight file."""
    state = _state(getkey)
    host = _host()
    live = tmp_path / f".ckpt-{os.getppid()}@{host}-inflight.tmp"
    dead = tmp_path / f".ckpt-{_dead_pid()}@{host}-killed.tmp"
    elsewhere = tmp_path / ".ckpt-1@another.host-remote.tmp"
    for f in (live, dead, elsewhere):
        f.write_bytes(b"half a write")
    for step in (1, 2, 3):
        adjoint.save_checkpoint(tmp_path, step, state)
    adjoint._checkpoint.prune_checkpoints(tmp_path, 1, state)
    assert live.exists() and dead.exists() and elsewhere.exists()
    assert [s for s, _ in adjoint._checkpoint.list_checkpoints(tmp_path)] == [3]
    removed = adjoint._checkpoint.remove_stale_temporaries(tmp_path)
    assert removed == [str(dead)]
    assert live.exists() and elsewhere.exists() and not dead.exists()
