"""adjoint.imitation: learning a pendulum planner's model and cost weight from expert
plans (gradients through control.solve), and `adjoint train imitation`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adjoint import cli, imitation


@pytest.fixture(autouse=True)
def _restore_jax_config():
    """The CLI sets precision and default device globally; put them back. The library
    test sets the same device, so that it and the CLI share compiled code."""
    x64, device = jax.config.jax_enable_x64, jax.config.jax_default_device
    jax.config.update("jax_default_device", jax.devices()[0])
    yield
    jax.config.update("jax_enable_x64", x64)
    jax.config.update("jax_default_device", device)


def test_learning_recovers_the_parameters():
    result = imitation.learn(jax.random.key(0), steps=150)  # 16 experts, N = 20
    initial = imitation.relative_errors(result.init, result.true)
    assert max(initial.values()) > 0.3  # the guess is off by tens of percent
    assert (result.solves_ok == 16).all()  # every plan converged, with a valid derivative
    assert result.loss[-1] < 1e-5 * result.loss[0]
    assert max(result.final_errors.values()) < 1e-2
    assert result.final_errors == imitation.relative_errors(result.learned, result.true)
    # the learner's plans reproduce the expert's
    scale = np.abs(result.expert_controls).max()
    assert np.abs(result.learned_controls - result.expert_controls).max() < 1e-3 * scale
    assert np.abs(result.initial_controls - result.expert_controls).max() > 0.1 * scale


def test_data_and_model():
    key = jax.random.key(1)
    x0s = imitation.initial_states(key, 5)
    assert x0s.shape == (5, 2) and bool(jnp.all(jnp.abs(x0s - jnp.array([jnp.pi, 0])) <= 1))
    true = imitation.true_pendulum()
    guess = imitation.initial_guess(key, true, spread=0.5)
    ratios = np.array([float(getattr(guess, n) / getattr(true, n)) for n in imitation.NAMES])
    assert (ratios >= np.exp(-0.5)).all() and (ratios <= np.exp(0.5)).all()
    problem = true.problem(x0s[0])
    assert problem.horizon == imitation.HORIZON and problem.control_size == 1
    # hanging still and unforced is an equilibrium; the gain scales the torque
    down = jnp.zeros(2)
    np.testing.assert_allclose(true.dynamics(down, jnp.zeros(1)), down)
    x1 = true.dynamics(down, jnp.ones(1))
    np.testing.assert_allclose(x1[1], imitation.DT * 2.0)
    with pytest.raises(ValueError, match="n_experts"):
        imitation.learn(key, n_experts=0)


def test_train_imitation_command(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "imitation", "--steps", "150", "--out", str(out), "--seed", "0"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "float64" in text and "every solve converged" in text
    lines = [ln for ln in text.splitlines() if ln.startswith("step")]
    assert len(lines) == 11  # steps 0, 15, …, 150
    first, last = (float(ln.split()[3]) for ln in (lines[0], lines[-1]))
    assert last < 1e-4 * first
    assert (out / "imitation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "imitation.json").read_text())
    assert summary["loss_final"] == pytest.approx(last, rel=1e-3)
    assert summary["all_solves_converged"]
    assert max(summary["relative_errors"].values()) < 1e-2
    assert len(summary["history"]["loss"]) == 151
    assert set(summary["learned"]) == set(imitation.NAMES)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "positive integer"),
        (["--steps", "ten"], "positive integer"),
    ],
)
def test_bad_steps_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "imitation", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_options_are_one_line(tmp_path, capsys):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    for argv, message in [
        (["--out", str(not_a_dir)], "is a file, not a directory"),
        (["--out", str(not_a_dir / "sub")], "cannot create the output directory"),
        (["--parallel"], "--parallel does not apply"),
        (["--batch-size", "4"], "--batch-size does not apply"),
        (["--lr", "0"], "--lr: expected a positive number"),
    ]:
        try:  # an argparse error exits, a later check returns the code
            code = cli.main(["train", "imitation", *argv])
        except SystemExit as exit_:
            code = exit_.code
        assert code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
