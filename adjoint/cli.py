"""The `adjoint` command.

    adjoint demo                 train a small multistage net with the costate recursion,
                                 check its gradients, plot the loss
    adjoint train TASK           train on a built-in task (see `adjoint train --help`)
    adjoint control NAME         solve a classic optimal-control problem
    adjoint bench [--quick]      run the benchmark suite

`python -m adjoint` runs the same command. Bad options give one line on stderr and exit
status 2.
"""

import argparse
import json
import os
import sys
import time


class _CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _common(p: argparse.ArgumentParser, *, steps: int | None, precision: str, out: str) -> None:
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=steps,
        help="optimiser steps" + (f" (default {steps})" if steps else " (default: the task's)"),
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
        help=f"floating-point bits (default {precision})",
    )
    p.add_argument("--out", default=out, help=f"output directory (default {out})")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate")
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


def _build_parser() -> argparse.ArgumentParser:
    from .tasks import TASKS

    parser = argparse.ArgumentParser(
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
        "with jax.grad and finite differences, and write a loss plot.",
    )
    _common(demo, steps=1500, precision="64", out="adjoint-demo")
    demo.add_argument(
        "--task",
        choices=["spirals", "parity"],
        default="spirals",
        help="data set (default spirals)",
    )

    train = sub.add_parser(
        "train",
        help="train on a built-in task",
        description="Train a multistage net on a built-in task generated in code, print "
        "progress, write a loss plot (loss.png), the metrics (history.json) and "
        "checkpoints (checkpoints/; a rerun resumes from the newest valid one).",
        epilog="tasks: " + "; ".join(f"{t.name}: {t.description}" for t in TASKS.values()),
    )
    train.add_argument("task", metavar="TASK", choices=sorted(TASKS), help=", ".join(TASKS))
    _common(train, steps=None, precision="32", out="adjoint-train")
    train.add_argument(
        "--checkpoint-every", type=_positive_int, default=None, help="steps between checkpoints"
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

    bench = sub.add_parser(
        "bench",
        help="run the benchmark suite",
        description="Run the benchmark suite (python -m benchmarks); results go to "
        "benchmarks/results/.",
    )
    bench.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    bench.epilog = "Other options (e.g. --only fit) are passed on to python -m benchmarks."
    return parser


# --------------------------------------------------------------------------------------


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
    devices, dtype = _setup_jax(args)
    import equinox as eqx
    import jax.numpy as jnp
    import numpy as np

    import adjoint

    from .tasks import TASKS

    base = TASKS[args.task]
    task = base._replace(sizes=(base.sizes[0], 32, 32, 1), batch_size=None)
    os.makedirs(args.out, exist_ok=True)
    print(
        f"adjoint demo: {task.sizes} tanh Multistage on {args.task} "
        f"(float{args.precision}, {len(devices)} {devices[0].platform} device(s)); "
        "gradients by the costate recursion"
    )
    t0 = time.perf_counter()
    _, data, result = _train(
        args, task, dtype, devices, steps=args.steps, checkpoint_dir=None, checkpoint_every=None
    )
    print(f"trained {result.step} steps in {time.perf_counter() - t0:.1f} s")

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
    devices, dtype = _setup_jax(args)
    from .tasks import TASKS

    task = TASKS[args.task]
    steps = args.steps if args.steps is not None else task.steps
    os.makedirs(args.out, exist_ok=True)
    ckpt_dir = os.path.join(args.out, "checkpoints")
    print(
        f"adjoint train {task.name}: {task.description}; {steps} steps, "
        f"float{args.precision}, {len(devices)} {devices[0].platform} device(s)"
    )
    every = args.checkpoint_every or max(1, steps // 8)
    t0 = time.perf_counter()
    _, _, result = _train(
        args, task, dtype, devices, steps=steps, checkpoint_dir=ckpt_dir, checkpoint_every=every
    )
    if result.resumed_from is not None:
        print(f"(resumed from the checkpoint at step {result.resumed_from})")
    print(f"done: {result.step} steps in {time.perf_counter() - t0:.1f} s")
    path = os.path.join(args.out, "loss.png")
    _plot(result.history, path, f"adjoint train {task.name}")
    hist = {k: v.tolist() for k, v in result.history.items()}
    with open(os.path.join(args.out, "history.json"), "w") as f:
        json.dump(hist, f)
    print(f"wrote {path}, {os.path.join(args.out, 'history.json')} and {result.checkpoint}")
    return 0


def _cmd_bench(args) -> int:
    try:
        from benchmarks.__main__ import main as bench_main
    except ImportError as err:
        raise _CLIError(
            f"the benchmark suite is not available ({err}); run 'adjoint bench' from a "
            "source checkout of adjoint"
        ) from None
    argv = (["--quick"] if args.quick else []) + list(args.rest)
    rc = bench_main(argv)
    return rc if isinstance(rc, int) else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `adjoint` console script; returns the exit status."""
    parser = _build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
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
        print(f"adjoint {args.command}: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"adjoint {args.command}: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"adjoint {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"adjoint {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
