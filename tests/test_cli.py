"""The `adjoint` command: help everywhere, a short train run, the demo, clear errors."""

import glob
import importlib.util
import json
import os
import stat
import subprocess
import sys
import tomllib
import types
import warnings

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
        for task in ("xor", "parity", "shift", "completion", "spirals", "imitation"):
            assert task in out
        assert "--fresh" in out and "adjoint-train/TASK" in out
    if argv == ["demo"]:
        assert "--precision" in out and "--out" in out and "--quick" in out
    if argv == ["control"]:
        from adjoint.problems import PROBLEMS

        assert all(name in out for name in PROBLEMS)
    if argv == ["bench"]:
        # the same run time as the README's `adjoint bench --quick` line
        assert "about 2.5 minutes on a 2-core CPU" in out
        readme = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")
        if os.path.exists(readme):
            with open(readme, encoding="utf-8") as f:
                assert "adjoint bench --quick" in f.read().split("about 2.5 minutes on 2 cores")[0]
        suites = cli._bench_suites()
        if suites is not None:
            assert all(name in out for name in suites)


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
    # fewer steps than the checkpoint: one line saying what to do, exit status 2
    rc, _, err = _run(argv[:3] + ["100"] + argv[4:], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "step 250" in err and "--steps 250 or more" in err and "--fresh" in err
    # --fresh deletes the old checkpoints and starts over
    assert cli.main(argv[:3] + ["100"] + argv[4:] + ["--fresh"]) == 0
    assert "resumed" not in capsys.readouterr().out
    assert sorted(os.listdir(out / "checkpoints"))[-1] == "ckpt-0000000100.adj"
    assert len(json.loads((out / "history.json").read_text())["loss"]) == 100


def test_each_task_has_its_own_default_folder(tmp_path, monkeypatch, capsys):
    """Switching task neither warns about mismatched checkpoints nor prunes the other's."""
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for task in ("xor", "parity", "xor"):
            argv = ["train", task, "--steps", "16", "--no-progress", "--precision", "64"]
            assert cli.main(argv) == 0
    assert [str(w.message) for w in caught] == []
    text = capsys.readouterr()
    assert "skipping checkpoint" not in text.err
    assert "resumed from the checkpoint at step 16" in text.out  # the second xor run
    for task in ("xor", "parity"):
        folder = tmp_path / "adjoint-train" / task
        assert (folder / "checkpoints" / "ckpt-0000000016.adj").exists()
        assert (folder / "loss.png").exists() and (folder / "history.json").exists()


def test_demo_trains_and_checks_gradients(tmp_path, capsys):
    """`adjoint demo --quick` (what the wheel job runs) is the whole demonstration."""
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "(2, 16, 16, 1)" in text and "trained 300 steps" in text
    assert "float64" in text and "stage | vs jax.grad | vs finite differences" in text
    worst = next(ln for ln in text.splitlines() if ln.startswith("worst:"))
    ad, fd = float(worst.split()[1]), float(worst.split()[4])
    assert ad < 1e-10 and fd < 1e-4
    steps = [ln.split() for ln in text.splitlines() if ln.startswith("step")]
    losses = [float(ln[3]) for ln in steps]
    assert len(losses) == 10 and losses[-1] < 0.5 * losses[0]
    assert float(steps[-1][-1]) > 0.8  # accuracy: it learned the spirals
    assert (out / "loss.png").exists()


def _run(argv, capsys):
    """`adjoint ARGV` in this process: (exit status, stdout, stderr)."""
    try:
        rc = cli.main(argv)
    except SystemExit as exit:
        rc = exit.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture
def bad_paths(tmp_path):
    """{file}: an existing file; {unwritable}: a directory nothing can be written to."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.access(locked, os.W_OK):  # root writes anywhere: use a place the kernel refuses
        unwritable = "/proc/adjoint-out"
        if not sys.platform.startswith("linux"):
            pytest.skip("running as root, and no read-only place known on this platform")
    else:
        unwritable = str(locked / "out")
    yield {"file": str(a_file), "unwritable": unwritable}
    locked.chmod(stat.S_IRWXU)


BAD = [
    # output directories: a file, below a file (its parents cannot be made), unwritable
    (["train", "xor", "--out", "{file}"], "is a file"),
    (["train", "xor", "--out", "{file}/sub"], "cannot create the output directory"),
    (["train", "xor", "--out", "{file}/a/b"], "cannot create the output directory"),
    (["train", "xor", "--out", "{unwritable}"], "output directory"),
    (["train", "imitation", "--out", "{file}"], "is a file"),
    (["train", "imitation", "--out", "{unwritable}"], "output directory"),
    (["demo", "--out", "{file}"], "is a file"),
    (["demo", "--quick", "--out", "{file}/sub"], "cannot create the output directory"),
    (["demo", "--out", "{unwritable}"], "output directory"),
    (["control", "lqr", "--out", "{file}"], "is a file"),
    (["control", "lqr", "--out", "{file}/sub"], "cannot create the output directory"),
    (["control", "lqr", "--out", "{unwritable}"], "output directory"),
    (["bench", "--quick", "--out", "{file}"], "is a file"),
    (["bench", "--out", "{unwritable}"], "output directory"),
    # numbers out of range or not numbers
    (["train", "xor", "--steps", "0"], "positive integer"),
    (["train", "xor", "--steps", "-3"], "positive integer"),
    (["train", "xor", "--steps", "ten"], "positive integer"),
    (["train", "xor", "--lr", "-1"], "positive number"),
    (["train", "xor", "--lr", "0"], "positive number"),
    (["train", "xor", "--lr", "nan"], "positive number"),
    (["train", "xor", "--batch-size", "0"], "positive integer"),
    (["train", "xor", "--checkpoint-every", "-5"], "positive integer"),
    (["train", "imitation", "--steps", "0"], "positive integer"),
    (["train", "imitation", "--lr", "-1"], "positive number"),
    (["demo", "--steps", "0"], "positive integer"),
    (["demo", "--lr", "-0.5"], "positive number"),
    (["control", "pendulum", "--max-steps", "-1"], "positive integer"),
    (["control", "pendulum", "--max-steps", "0"], "positive integer"),
    (["control", "pendulum", "--horizon", "0"], "positive integer"),
    (["control", "pendulum", "--seed", "x"], "invalid int value"),
    # unknown names and options
    (["frobnicate"], "invalid choice"),
    (["train", "nosuchtask"], "invalid choice"),
    (["train"], "required"),
    (["train", "xor", "--precision", "16"], "invalid choice"),
    (["train", "xor", "--device", "quantum"], "invalid choice"),
    (["train", "xor", "--bogus"], "unrecognized arguments"),
    (["train", "imitation", "--batch-size", "4"], "does not apply"),
    (["demo", "--task", "nosuchtask"], "invalid choice"),
    (["control", "nosuchproblem"], "invalid choice"),
    (["control", "lqr", "--method", "newton"], "invalid choice"),
    (["bench", "--only", "nosuchsuite"], "nosuchsuite"),
    (["bench", "--frobnicate"], "unrecognized arguments"),
    (["bench", "--out", "x", "--update-results"], "not allowed with"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_user_errors_are_one_line_exit_2(argv, message, bad_paths, capsys):
    """Every bad path, number or name: exit status 2, one line on stderr, no traceback
    (and no training: each of these fails before JAX does any work)."""
    argv = [a.format(**bad_paths) for a in argv]
    rc, out, err = _run(argv, capsys)
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("adjoint") and "error" in lines[0] and message in lines[0]
    assert not out.startswith("usage")


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


def test_control_subcommand(capsys):
    if importlib.util.find_spec("adjoint.control.cli") is None:
        assert cli.main(["control", "lqr"]) == 2
        err = capsys.readouterr().err
        assert "not available" in err and len(err.strip().splitlines()) == 1
    else:
        with pytest.raises(SystemExit) as info:
            cli.main(["control", "--help"])
        assert info.value.code == 0


def test_bench_passes_options_through(monkeypatch, tmp_path):
    seen = []
    fake = types.ModuleType("benchmarks.__main__")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "benchmarks.__main__", fake)
    assert cli.main(["bench", "--quick", "--only", "fit"]) == 0
    out = str(tmp_path / "b")
    assert cli.main(["bench", "--only", "fit", "costate", "--device", "cpu", "--out", out]) == 0
    assert cli.main(["bench", "--update-results"]) == 0
    assert seen == [
        ["--quick", "--only", "fit"],
        ["--only", "fit", "costate", "--device", "cpu", "--out", out],
        ["--update-results"],
    ]


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


NOTEBOOKS = sorted(
    glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "notebooks", "*.ipynb"))
)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_install_cell(path, tmp_path, monkeypatch, capsys):
    """The first code cell installs `adjoint-jax @ git+URL` (URL from pyproject.toml, set in
    one place) on a fresh runtime, fails with one line saying what to set, and does
    nothing when the package is importable."""
    with open(path, encoding="utf-8") as f:
        cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
    cell = "".join(cells[0]["source"])
    with open(os.path.join(os.path.dirname(path), "..", "pyproject.toml"), "rb") as f:
        url = tomllib.load(f)["project"]["urls"]["Source"]
    assert cell.count(url) == 1 and f'ADJOINT_REPO = "{url}"' in cell.splitlines()[3]
    runs = []

    def fake_run(cmd, **kwargs):
        runs.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "fatal: unable to access the URL\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    exec(compile(cell, path, "exec"), {})  # adjoint is importable here: nothing happens
    assert runs == [] and capsys.readouterr() == ("", "")

    monkeypatch.chdir(tmp_path)  # no checkout beside the notebook
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    exec(compile(cell, path, "exec"), {})
    err = capsys.readouterr().err
    assert runs[0][-1] == f"adjoint-jax @ git+{url}"
    assert len(err.strip().splitlines()) == 1 and "set ADJOINT_REPO" in err
    monkeypatch.setenv("ADJOINT_REPO", "https://github.com/someone/fork")
    exec(compile(cell, path, "exec"), {})
    assert runs[1][-1] == "adjoint-jax @ git+https://github.com/someone/fork"
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_another_tasks_checkpoints_are_one_line(tmp_path, capsys):
    """One --out for two tasks: the second is refused with one line naming the files."""
    out = str(tmp_path / "shared")
    base = ["--steps", "8", "--no-progress", "--precision", "64", "--out", out]
    assert cli.main(["train", "xor", *base]) == 0
    capsys.readouterr()
    rc, _, err = _run(["train", "parity", *base], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "ckpt-0000000008.adj" in err and "--fresh" in err
    assert cli.main(["train", "parity", *base, "--fresh"]) == 0
