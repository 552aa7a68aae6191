"""The `adjoint` command: help everywhere, a short train run, the demo, clear errors."""

import importlib.util
import json
import os
import subprocess
import sys
import types

import equinox as eqx
import jax
import numpy as np
import pytest

from adjoint import cli


@pytest.fixture(autouse=True)
def _restore_jax_config():
    """The CLI sets precision and default device globally; put them back."""
    x64, device = jax.config.jax_enable_x64, jax.config.jax_default_device
    yield
    jax.config.update("jax_enable_x64", x64)
    jax.config.update("jax_default_device", device)


@pytest.mark.parametrize("argv", [[], ["demo"], ["train"], ["control"], ["bench"]])
def test_help_on_every_subcommand(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv + ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: adjoint")
    if argv == ["train"]:
        for task in ("xor", "parity", "shift", "completion", "spirals"):
            assert task in out
    if argv == ["demo"]:
        assert "--precision" in out and "--out" in out


def test_python_dash_m_runs_the_same_command():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-m", "adjoint", "--help"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0 and "demo" in out.stdout and "train" in out.stdout


def test_train_writes_plot_history_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "xor",
        "--steps",
        "200",
        "--out",
        str(out),
        "--no-progress",
        "--precision",
        "64",
        "--lr",
        "0.05",
        "--seed",
        "1",
    ]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if ln.startswith("step")]
    assert len(lines) == 10
    first, last = (float(ln.split()[3]) for ln in (lines[0], lines[-1]))
    assert last < 0.5 * first  # the loss falls
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hist = json.loads((out / "history.json").read_text())
    assert len(hist["loss"]) == 200 and hist["step"][-1] == 200
    assert (out / "checkpoints" / "ckpt-0000000200.adj").exists()
    # a rerun with more steps resumes from that checkpoint
    assert cli.main(argv[:3] + ["250"] + argv[4:]) == 0
    assert "resumed from the checkpoint at step 200" in capsys.readouterr().out


def test_demo_trains_and_checks_gradients(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--steps", "40", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "float64" in text and "stage | vs jax.grad | vs finite differences" in text
    worst = next(ln for ln in text.splitlines() if ln.startswith("worst:"))
    ad, fd = float(worst.split()[1]), float(worst.split()[4])
    assert ad < 1e-10 and fd < 1e-4
    losses = [float(ln.split()[3]) for ln in text.splitlines() if ln.startswith("step")]
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert (out / "loss.png").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "nosuchtask"], "invalid choice"),
        (["train", "xor", "--steps", "0"], "positive integer"),
        (["train", "xor", "--precision", "16"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
        (["control", "pendulum", "--max-steps", "-1"], "positive integer"),
        (["control", "pendulum", "--horizon", "0"], "positive integer"),
        (["control", "nosuchproblem"], "invalid choice"),
    ],
)
def test_bad_options_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("adjoint")


def test_library_errors_are_one_line(tmp_path, capsys):
    rc = cli.main(
        [
            "train",
            "xor",
            "--batch-size",
            "9",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--precision",
            "64",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--batch-size 9" in err
    rc = cli.main(["train", "xor", "--device", "tpu", "--out", str(tmp_path), "--precision", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "'tpu' is not available" in err


def test_control_bad_out_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    rc = cli.main(["control", "lqr", "--horizon", "3", "--out", str(a_file / "sub")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "cannot create the output directory" in err


def test_control_subcommand(capsys):
    if importlib.util.find_spec("adjoint.control.cli") is None:
        assert cli.main(["control", "lqr"]) == 2
        err = capsys.readouterr().err
        assert "not available" in err and len(err.strip().splitlines()) == 1
    else:
        with pytest.raises(SystemExit) as info:
            cli.main(["control", "--help"])
        assert info.value.code == 0


def test_bench_passes_options_through(monkeypatch):
    seen = []
    fake = types.ModuleType("benchmarks.__main__")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "benchmarks.__main__", fake)
    assert cli.main(["bench", "--quick", "--only", "fit"]) == 0
    assert seen == [["--quick", "--only", "fit"]]


def test_bench_missing_suite_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "benchmarks.__main__", None)  # import raises ImportError
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err
    assert "benchmark suite is not available" in err and len(err.strip().splitlines()) == 1


def test_tasks_generate_consistent_data(getkey):
    from adjoint.tasks import TASKS, pattern_completion, shift_motifs

    for task in TASKS.values():
        x, y = jax.eval_shape(task.data, getkey())
        model = eqx.filter_eval_shape(task.model, getkey())
        assert x.shape[1] == task.sizes[0] and y.shape[1] == task.sizes[-1]
        assert eqx.filter_eval_shape(lambda m, x: m(x), model, x).shape == y.shape
    x, y = TASKS["parity"].data(getkey())
    assert x.shape == (16, 4) and set(np.unique(np.asarray(y))) == {-1.0, 1.0}
    x, y = jax.jit(lambda k: shift_motifs(12, key=k, copies=1))(getkey())
    # every circular shift of a pattern has the same class
    assert x.shape == (24, 12)
    assert len({tuple(r) for r in np.asarray(x).tolist()}) == 24  # no pattern in both classes
    assert ((np.asarray(x) == 1).sum(axis=1) == 3).all()
    np.testing.assert_array_equal(np.asarray(x[0, :4]), [1, 1, -1, 1])
    np.testing.assert_array_equal(np.roll(np.asarray(x[0]), 3), np.asarray(x[3]))
    assert y[0, 0] == y[3, 0] == 1 and y[12, 0] == -1
    x, y = jax.jit(lambda k: pattern_completion(10, 4, 3, key=k, copies=5))(getkey())
    assert ((x == 0).sum(axis=1) == 3).all() and bool(((x == y) | (x == 0)).all())
    with pytest.raises(ValueError, match="n_hidden_units"):
        pattern_completion(10, 4, 10, key=getkey())
