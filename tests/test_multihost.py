"""`fit` with `DataParallel` across two processes (`jax.distributed`, CPU collectives).

Two Python processes on this machine, one CPU device each, form one two-device mesh
through `jax.distributed.initialize` and gloo CPU collectives. The run must equal the
single-process run to 1e-12 (float64), only process 0 may write checkpoints, and a run
killed (SIGKILL) in both processes must resume from the shared checkpoint directory and
end bit-identical to an uninterrupted one.
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adjoint


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY, KILL_AT = 12, 4, 8

# The problem, shared by the workers and this process (the single-process reference).
PROBLEM = textwrap.dedent(
    f"""
    import jax, jax.numpy as jnp, optax
    import adjoint

    def make():
        k = jax.random.split(jax.random.key(3), 4)
        model = adjoint.Multistage(
            [adjoint.Dense(2, 8, "tanh", key=k[0]), adjoint.Dense(8, 1, "tanh", key=k[1])]
        )
        x = jax.random.normal(k[2], (16, 2), jnp.float64)
        data = (x, jnp.tanh(x[:, :1] * x[:, 1:]))
        loss = lambda m, b: jnp.mean((b[1] - m(b[0])) ** 2)
        kwargs = dict(steps={STEPS}, batch_size=8, key=k[3], steps_per_dispatch={EVERY},
                      checkpoint_every={EVERY}, progress=False)
        return model, loss, data, optax.adam(0.05), kwargs
    """
)

WORKER = textwrap.dedent(
    """
    import os, signal, sys
    pid, port, ckdir, kill_at, out = sys.argv[1:]
    pid, kill_at = int(pid), int(kill_at)
    import jax
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
            initialization_timeout=60,
        )
    except Exception as err:
        print(f"INIT FAILED: {type(err).__name__}: {err}".splitlines()[0], flush=True)
        sys.exit(3)
    import equinox as eqx, numpy as np
    import adjoint
    from adjoint._checkpoint import host_tree
    from problem import make

    assert jax.process_count() == 2 and len(jax.devices()) == 2, jax.devices()

    def log(step, metrics):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    model, loss, data, opt, kw = make()
    res = adjoint.fit(model, loss, data, opt, **kw, parallel=adjoint.DataParallel(),
                      checkpoint_dir=ckdir, log=log)
    leaves = jax.tree.leaves(host_tree(eqx.filter(res.model, eqx.is_inexact_array)))
    np.savez(out, loss=res.history["loss"], step=res.num_steps,
             resumed_from=-1 if res.resumed_from is None else res.resumed_from,
             *[np.asarray(x) for x in leaves])
    """
)


def _skip_without_cpu_collectives():
    if "jax_cpu_collectives_implementation" not in jax.config.values:
        pytest.skip(
            f"jax {jax.__version__} has no jax_cpu_collectives_implementation option: "
            "no CPU collectives across processes"
        )
    try:
        from jax._src.lib import _jax
    except ImportError as err:
        pytest.skip(f"cannot inspect jaxlib for gloo CPU collectives ({err})")
    if not hasattr(_jax, "make_gloo_tcp_collectives"):
        pytest.skip(f"jaxlib {jax.__version__} was built without gloo CPU collectives")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, name, ckdirs, kill_at=0):
    """Run the worker as processes 0 and 1; returns their (returncode, output) pairs."""
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), ROOT, env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(tmp_path / "worker.py"),
                str(pid),
                str(port),
                str(ckdirs[pid]),
                str(kill_at),
                str(tmp_path / f"{name}-{pid}.npz"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in (0, 1)
    ]
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            results.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for rc, out in results:
        if rc == 3 and "INIT FAILED" in out:
            reason = next(ln for ln in out.splitlines() if "INIT FAILED" in ln)
            pytest.skip(f"jax.distributed.initialize with gloo failed here: {reason}")
    return results


def _load(path):
    with np.load(path) as f:
        leaves = [f[f"arr_{i}"] for i in range(len(f.files) - 3)]
        return leaves, f["loss"], int(f["step"]), int(f["resumed_from"])


def _ckpts(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".adj")) if d.is_dir() else []


def test_two_processes_match_one_and_resume_after_kill(tmp_path, monkeypatch):
    _skip_without_cpu_collectives()
    (tmp_path / "problem.py").write_text(PROBLEM)
    (tmp_path / "worker.py").write_text(WORKER)

    # 1. an uninterrupted run; each process gets its own checkpoint_dir
    own = [tmp_path / "ck-process0", tmp_path / "ck-process1"]
    for rc, out in _launch(tmp_path, "full", own):
        assert rc == 0, out[-3000:]
    assert _ckpts(own[0]) == [f"ckpt-{s:010d}.adj" for s in range(EVERY, STEPS + 1, EVERY)]
    assert _ckpts(own[1]) == []  # only process 0 writes checkpoints
    full = [_load(tmp_path / f"full-{pid}.npz") for pid in (0, 1)]
    for a, b in zip(full[0][0], full[1][0]):  # both processes hold the same controls
        np.testing.assert_array_equal(a, b)

    # 2. the same problem in this process, one device, no collectives
    monkeypatch.syspath_prepend(str(tmp_path))
    from problem import make

    assert jnp.zeros(()).dtype == jnp.float64  # conftest enables float64
    model, loss, data, opt, kw = make()
    ref = adjoint.fit(model, loss, data, opt, **kw)
    ref_leaves = [
        np.asarray(x) for x in jax.tree.leaves(eqx.filter(ref.model, eqx.is_inexact_array))
    ]
    leaves, losses, step, _ = full[0]
    assert step == STEPS and len(leaves) == len(ref_leaves)
    for a, b in zip(leaves, ref_leaves):
        assert a.dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    np.testing.assert_allclose(losses, ref.history["loss"], rtol=0, atol=1e-12)

    # 3. killed with SIGKILL in both processes at step KILL_AT, then resumed
    shared = tmp_path / "ck-shared"
    for rc, out in _launch(tmp_path, "killed", [shared, shared], kill_at=KILL_AT):
        assert rc == -signal.SIGKILL, out[-3000:]
    assert _ckpts(shared) == [f"ckpt-{s:010d}.adj" for s in range(EVERY, KILL_AT, EVERY)]
    for rc, out in _launch(tmp_path, "resumed", [shared, shared]):
        assert rc == 0, out[-3000:]
    for pid in (0, 1):
        leaves, losses, step, resumed_from = _load(tmp_path / f"resumed-{pid}.npz")
        assert step == STEPS and resumed_from == KILL_AT - EVERY
        for a, b in zip(leaves, full[0][0]):
            np.testing.assert_array_equal(a, b)  # bit-identical to the uninterrupted run
        np.testing.assert_array_equal(losses, full[0][1])
