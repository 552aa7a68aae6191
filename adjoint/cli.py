"""The `adjoint` command.

    adjoint demo [--quick]       train a small multistage net with the costate recursion,
                                 check its gradients, plot the loss
    adjoint train TASK           train on a built-in task (see `adjoint train --help`);
                                 `adjoint train imitation` learns a planner's model and
                                 cost from expert plans (adjoint.imitation)
    adjoint control NAME         solve a classic optimal-control problem
    adjoint bench [--quick]      run the benchmark suite

`python -m adjoint` runs the same command. Every user error (a bad option, number, name
or output directory) is one line on stderr and exit status 2, never a traceback.
"""

import argparse
import ast
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time


class _CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line on stderr (`PROG: error: ...`, exit
    status 2) instead of a usage block; `--help` still shows the usage. Subparsers
    inherit the class."""

    def error(self, message: str):
        message = " ".join(message.split())  # one line, whatever argparse composed
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _common(
    p: argparse.ArgumentParser,
    *,
    steps: int | None,
    precision: str | None,
    out: str | None,
    steps_help: str | None = None,
) -> None:
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=steps,
        help="optimiser steps (default: " + (steps_help or "the task's") + ")",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "gpu", "tpu"],
        default="auto",
        help="JAX platform to run on (default: JAX's choice)",
    )
    p.add_argument(
        "--precision",
        choices=["32", "64"],
        default=precision,
        help=f"floating-point bits (default {precision or '32; 64 for imitation'})",
    )
    p.add_argument(
        "--out",
        default=out,
        metavar="DIR",
        help=f"output directory, created if missing (default {out or 'adjoint-train/TASK'})",
    )
    p.add_argument(
        "--lr", type=_positive_float, default=None, help="Adam learning rate (default: the task's)"
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=None, help="patterns per step (default: all)"
    )
    p.add_argument(
        "--parallel",
        action="store_true",
        help="shard each minibatch over all devices (adjoint.DataParallel)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _bench_suites() -> tuple[str, ...] | None:
    """The suite names of `python -m benchmarks` (its SUITES tuple, read without importing
    it: that would import JAX), or None outside a source checkout."""
    try:
        spec = importlib.util.find_spec("benchmarks")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        try:
            with open(os.path.join(folder, "__main__.py"), encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError):
            continue
        for node in tree.body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
                "SUITES"
            ]:
                try:
                    return tuple(ast.literal_eval(node.value))
                except ValueError:
                    return None
    return None


DEMO_QUICK = {"steps": 300, "hidden": 16}  # `adjoint demo --quick`


def _build_parser() -> argparse.ArgumentParser:
    from .tasks import TASKS

    parser = _Parser(
        prog="adjoint",
        description="Back-propagation as the costate recursion of a Lagrangian (LeCun, 1988).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="train a small net with the costate recursion and check its gradients",
        description="Train a 2-32-32-1 tanh multistage net on two spirals with the costate "
        "recursion (fit + Adam), print the loss falling, compare the costate gradients "
        "with jax.grad and finite differences, and write a loss plot (adjoint-demo/loss.png). "
        f"--quick runs the same demonstration with {DEMO_QUICK['steps']} steps and "
        f"2-{DEMO_QUICK['hidden']}-{DEMO_QUICK['hidden']}-1.",
    )
    _common(
        demo,
        steps=None,
        precision="64",
        out="adjoint-demo",
        steps_help=f"1500; {DEMO_QUICK['steps']} with --quick",
    )
    demo.add_argument(
        "--task",
        choices=["spirals", "parity"],
        default="spirals",
        help="data set: spirals or parity (default spirals)",
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help=f"a faster demonstration: {DEMO_QUICK['steps']} steps and "
        f"{DEMO_QUICK['hidden']} units per hidden layer (default: 1500 steps, 32 units)",
    )

    train = sub.add_parser(
        "train",
        help="train on a built-in task",
        description="Train a multistage net on a built-in task generated in code, print "
        "progress, write a loss plot (loss.png), the metrics (history.json) and "
        "checkpoints (checkpoints/; a rerun resumes from the newest valid one, --fresh "
        "starts over) into adjoint-train/TASK/ (or --out DIR). The imitation task learns "
        "a planner instead and writes imitation.png and imitation.json.",
        epilog="tasks: "
        + "; ".join(f"{t.name}: {t.description}" for t in TASKS.values())
        + f"; imitation: {IMITATION}",
    )
    names = [*TASKS, "imitation"]
    train.add_argument(
        "task", metavar="TASK", choices=sorted(names), help="one of: " + ", ".join(names)
    )
    _common(train, steps=None, precision=None, out=None)
    train.add_argument(
        "--checkpoint-every", type=_positive_int, default=None, help="steps between checkpoints"
    )
    train.add_argument(
        "--fresh",
        action="store_true",
        help="start over: delete the task's checkpoints in the output directory first",
    )

    try:
        from .control.cli import add_parser as add_control, run as run_control
    except ImportError as err:
        reason = str(err)
        control = sub.add_parser(
            "control", help="optimal-control problems (not available in this build)"
        )
        control.add_argument("name", nargs="?", help="problem name")

        def run_control(args, reason=reason):
            raise _CLIError(f"'adjoint control' is not available in this build ({reason})")

        add_control = None
    if add_control is not None:
        add_control(sub)
    parser.set_defaults(_run_control=run_control)

    suites = _bench_suites()
    bench = sub.add_parser(
        "bench",
        help="run the benchmark suite",
        description="Run the benchmark suite (python -m benchmarks, from a source checkout); "
        "results go to ./adjoint-bench/ (or --out DIR); --update-results rewrites the "
        "committed tables in benchmarks/results/. --quick takes about 2.5 minutes on a "
        "2-core CPU; the full sizes take much longer.",
        epilog="suites: "
        + (", ".join(suites) if suites else "(none found: run from a source checkout)"),
    )
    bench.add_argument(
        "--quick", action="store_true", help="small sizes (about 2.5 minutes on a 2-core CPU)"
    )
    bench.add_argument(
        "--only",
        nargs="+",
        metavar="SUITE",
        choices=suites,
        help="run only these suites" + (": " + ", ".join(suites) if suites else ""),
    )
    bench.add_argument(
        "--device",
        choices=("cpu", "gpu", "tpu"),
        default=None,
        help="JAX platform to run on (default: JAX's choice)",
    )
    where = bench.add_mutually_exclusive_group()
    where.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="directory for JSON, Markdown and PNG (default ./adjoint-bench)",
    )
    where.add_argument(
        "--update-results",
        action="store_true",
        help="write into the committed tables in benchmarks/results/",
    )
    return parser


# --------------------------------------------------------------------------------------


def _make_out(path: str) -> None:
    """Create the output directory and check that a file can be written there (a one-line
    error otherwise; `os.access` alone would pass for root on a read-only place)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise _CLIError(f"the output directory {path!r} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise _CLIError(
            f"cannot create the output directory {path!r} ({err.strerror or err})"
        ) from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise _CLIError(
            f"the output directory {path!r} is not writable ({err.strerror or err})"
        ) from None


def _setup_jax(args):
    """Precision and device: returns (devices, dtype) and makes devices[0] the default."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", args.precision == "64")
    platform = None if args.device == "auto" else args.device
    try:
        devices = jax.devices(platform)
    except RuntimeError as err:
        raise _CLIError(f"device {args.device!r} is not available ({err})") from None
    jax.config.update("jax_default_device", devices[0])
    dtype = jnp.float64 if args.precision == "64" else jnp.float32
    return devices, dtype


def _train(args, task, dtype, devices, *, steps, checkpoint_dir, checkpoint_every, lines=10):
    """Shared by demo and train: fit with Adam, print the loss a handful of times."""
    import jax
    import optax

    import adjoint

    from .tasks import accuracy, mse

    dkey, mkey, fkey = jax.random.split(jax.random.key(args.seed), 3)
    data = task.data(dkey, dtype)
    model = task.model(mkey, dtype)
    lr = args.lr if args.lr is not None else task.learning_rate
    batch_size = args.batch_size if args.batch_size is not None else task.batch_size
    n = data[0].shape[0]
    if batch_size is not None and batch_size > n:
        raise _CLIError(f"--batch-size {batch_size} is larger than the {n} patterns of the task")
    parallel = adjoint.DataParallel(devices) if args.parallel else None
    every = max(1, steps // lines)

    def log(step, metrics):
        print(
            f"step {step:6d}   loss {metrics['loss']:.6f}   "
            f"full-data loss {metrics['mse']:.6f}   accuracy {metrics['accuracy']:.3f}",
            flush=True,
        )

    progress = False if args.no_progress else None
    result = adjoint.fit(
        model,
        mse,
        data,
        optax.adam(lr),
        steps=steps,
        batch_size=batch_size,
        key=fkey,
        steps_per_dispatch=min(every, 500),
        eval_fn=lambda m: {"mse": mse(m, data), "accuracy": accuracy(m, data)},
        eval_every=every,
        log=log,
        progress=progress,
        parallel=parallel,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
    )
    return model, data, result


def _plot(history, path, title, extra=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 2 if extra is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 3.8))
    ax = axes[0] if ncols == 2 else axes
    ax.semilogy(history["step"], history["loss"], lw=0.8, alpha=0.6, label="training loss per step")
    if "eval_mse" in history:
        ax.semilogy(history["eval_step"], history["eval_mse"], "o-", label="full-data loss (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("C (mean squared error)")
    ax.set_title(title)
    ax.legend()
    if extra is not None:
        extra(axes[1])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cmd_demo(args) -> int:
    _make_out(args.out)
    devices, dtype = _setup_jax(args)
    import equinox as eqx
    import jax.numpy as jnp
    import numpy as np

    import adjoint

    from .tasks import TASKS

    hidden = DEMO_QUICK["hidden"] if args.quick else 32
    if args.steps is None:
        args.steps = DEMO_QUICK["steps"] if args.quick else 1500
    base = TASKS[args.task]
    task = base._replace(sizes=(base.sizes[0], hidden, hidden, 1), batch_size=None)
    print(
        f"adjoint demo: {task.sizes} tanh Multistage on {args.task} "
        f"(float{args.precision}, {len(devices)} {devices[0].platform} device(s)); "
        "gradients by the costate recursion"
    )
    t0 = time.perf_counter()
    _, data, result = _train(
        args, task, dtype, devices, steps=args.steps, checkpoint_dir=None, checkpoint_every=None
    )
    print(f"trained {result.num_steps} steps in {time.perf_counter() - t0:.1f} s")

    x, d = data
    check = adjoint.check_gradients(result.model, x, lambda states: jnp.sum((d - states[-1]) ** 2))
    ad, fd = check.worst
    print("\ncostate recursion vs jax.grad vs finite differences (relative errors):")
    print(check.table())
    print(f"worst: {ad:.1e} vs jax.grad, {fd:.1e} vs finite differences")

    def regions(ax):
        if x.shape[1] != 2:
            ax.axis("off")
            return
        g = np.linspace(-1.3, 1.3, 120)
        gx, gy = np.meshgrid(g, g)
        grid = jnp.asarray(np.stack([gx.ravel(), gy.ravel()], 1), dtype)
        z = np.asarray(eqx.filter_jit(result.model)(grid)).reshape(gx.shape)
        ax.contourf(gx, gy, z, levels=20, cmap="RdBu", alpha=0.7)
        xs, ds = np.asarray(x), np.asarray(d[:, 0])
        ax.scatter(xs[:, 0], xs[:, 1], c=ds, cmap="RdBu", edgecolors="k", linewidths=0.3, s=18)
        ax.set_title("output X(N) after training")
        ax.set_aspect("equal")

    path = os.path.join(args.out, "loss.png")
    _plot(result.history, path, f"adjoint demo: {args.task}", regions)
    print(f"\nwrote {path}")
    return 0


def _cmd_train(args) -> int:
    if args.task == "imitation":
        return _cmd_imitation(args)
    args.precision = args.precision or "32"
    _make_out(args.out)
    ckpt_dir = os.path.join(args.out, "checkpoints")
    if args.fresh:
        _clear_checkpoints(ckpt_dir)
    devices, dtype = _setup_jax(args)
    from .tasks import TASKS

    task = TASKS[args.task]
    steps = args.steps if args.steps is not None else task.steps
    print(
        f"adjoint train {task.name}: {task.description}; {steps} steps, "
        f"float{args.precision}, {len(devices)} {devices[0].platform} device(s)"
        + ("; starting fresh" if args.fresh else "")
    )
    every = args.checkpoint_every or max(1, steps // 8)
    t0 = time.perf_counter()
    try:
        _, _, result = _train(
            args, task, dtype, devices, steps=steps, checkpoint_dir=ckpt_dir, checkpoint_every=every
        )
    except ValueError as err:
        from ._checkpoint import CheckpointMismatchError

        if isinstance(err, CheckpointMismatchError):  # another model's checkpoints
            raise _CLIError(f"{err} (--fresh deletes them)".replace("\n", " ")) from None
        beyond = re.search(r"checkpoint (.+) is at step (\d+), beyond steps=", str(err))
        if beyond is None:
            raise
        path, at = beyond.groups()
        raise _CLIError(
            f"the checkpoint {path} is at step {at}, beyond --steps {steps}: pass --steps "
            f"{at} or more to continue it, or --fresh to start over"
        ) from None
    if result.resumed_from is not None:
        print(f"(resumed from the checkpoint at step {result.resumed_from})")
    print(f"done: {result.num_steps} steps in {time.perf_counter() - t0:.1f} s")
    path = os.path.join(args.out, "loss.png")
    _plot(result.history, path, f"adjoint train {task.name}")
    hist = {k: v.tolist() for k, v in result.history.items()}
    with open(os.path.join(args.out, "history.json"), "w") as f:
        json.dump(hist, f)
    print(f"wrote {path}, {os.path.join(args.out, 'history.json')} and {result.checkpoint}")
    return 0


def _clear_checkpoints(directory: str) -> None:
    """`--fresh`: delete the checkpoint files of `directory` and the temporary files of
    writers that are no longer running (another writer's in-flight file stays)."""
    from ._checkpoint import list_checkpoints, remove_stale_temporaries

    try:
        remove_stale_temporaries(directory)
        for _, path in list_checkpoints(directory):
            os.unlink(path)
    except OSError as err:
        raise _CLIError(f"--fresh: cannot delete {err.filename} ({err.strerror})") from None


IMITATION = (
    "learn a pendulum planner's gravity, damping, actuator gain and control weight from "
    "16 expert plans, by gradients through control.solve (Amos et al. 2018; float64 "
    "by default)"
)


def _cmd_imitation(args) -> int:
    """`adjoint train imitation`: `adjoint.imitation.learn`, its progress, a plot
    (imitation.png) and a summary (imitation.json)."""
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--checkpoint-every", args.checkpoint_every),
        ("--parallel", args.parallel or None),
    ):
        if value is not None:
            raise _CLIError(f"{flag} does not apply to the imitation task")
    lr = 0.1 if args.lr is None else args.lr
    args.precision = args.precision or "64"
    _make_out(args.out)  # --fresh: nothing to clear, the imitation task keeps no checkpoints
    devices, dtype = _setup_jax(args)
    import jax
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import imitation

    steps = 300 if args.steps is None else args.steps
    n_experts = 16
    print(
        f"adjoint train imitation: learn a pendulum planner's model and cost weight from "
        f"{n_experts} expert plans (N = {imitation.HORIZON}); {steps} Adam steps (lr {lr}), "
        f"float{args.precision}, {devices[0].platform}"
    )

    def log(step, loss, errors, solves_ok):
        errs = "  ".join(f"{name} {value:.1e}" for name, value in errors.items())
        print(
            f"step {step:6d}   loss {loss:.3e}   relative errors: {errs}   "
            f"solves ok {solves_ok}/{n_experts}",
            flush=True,
        )

    result = imitation.learn(
        jax.random.key(args.seed), steps=steps, n_experts=n_experts, learning_rate=lr, log=log
    )
    if not np.isfinite(result.loss).all():
        print("adjoint train: the imitation loss became non-finite", file=sys.stderr)
        return 1
    print(f"done: {steps} steps in {result.seconds:.1f} s (compilation included)")
    names = imitation.NAMES
    print(f"{'parameter':>15} {'true':>10} {'initial':>10} {'learned':>12} {'rel. error':>10}")
    for name in names:
        t, i, v = (float(getattr(p, name)) for p in (result.true, result.init, result.learned))
        print(f"{name:>15} {t:10.4f} {i:10.4f} {v:12.8f} {result.final_errors[name]:10.1e}")
    all_ok = bool((result.solves_ok == n_experts).all())
    print(
        f"loss {result.loss[0]:.3e} -> {result.loss[-1]:.3e}; "
        + ("every solve converged" if all_ok else "some solves did not converge (left out)")
    )

    png = os.path.join(args.out, "imitation.png")
    fig = imitation.figure(result)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    as_dict = lambda p: {name: float(getattr(p, name)) for name in names}
    summary = {
        "task": "imitation",
        "steps": steps,
        "seed": args.seed,
        "learning_rate": lr,
        "precision": int(args.precision),
        "n_experts": n_experts,
        "horizon": imitation.HORIZON,
        "dt": imitation.DT,
        "true": as_dict(result.true),
        "initial": as_dict(result.init),
        "learned": as_dict(result.learned),
        "relative_errors": result.final_errors,
        "loss_initial": float(result.loss[0]),
        "loss_final": float(result.loss[-1]),
        "all_solves_converged": all_ok,
        "seconds": result.seconds,
        "plot": png,
        "history": {
            "loss": result.loss.tolist(),
            "relative_errors": {k: v.tolist() for k, v in result.errors.items()},
            "solves_ok": result.solves_ok.tolist(),
        },
    }
    path = os.path.join(args.out, "imitation.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {png} and {path}")
    return 0


def _cmd_bench(args) -> int:
    if args.out is not None:
        _make_out(args.out)
    try:
        from benchmarks.__main__ import main as bench_main
    except ImportError as err:
        raise _CLIError(
            f"the benchmark suite is not available ({err}); run 'adjoint bench' from a "
            "source checkout of adjoint"
        ) from None
    argv = ["--quick"] if args.quick else []
    if args.only:
        argv += ["--only", *args.only]
    if args.device is not None:
        argv += ["--device", args.device]
    if args.out is not None:
        argv += ["--out", args.out]
    if args.update_results:
        argv += ["--update-results"]
    rc = bench_main(argv)
    return rc if isinstance(rc, int) else 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `adjoint` console script; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and args.out is None:
        args.out = os.path.join("adjoint-train", args.task)  # one folder per task
    from ._fit import NonFiniteLossError

    try:
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "bench":
            return _cmd_bench(args)
        if args.command == "control":
            rc = args._run_control(args)
            return rc if isinstance(rc, int) else 0
        parser.error(f"unknown command {args.command!r}")
    except _CLIError as err:
        print(f"adjoint {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"adjoint {args.command}: {_one_line(err)}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"adjoint {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"adjoint {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
