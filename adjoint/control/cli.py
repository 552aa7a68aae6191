"""`adjoint control NAME`: solve a classic problem and plot its states, controls,
costates (paper's sign) and stage Hamiltonian.

`adjoint/cli.py` registers this with `add_parser(subparsers)`; `run(args)` does the work
and returns a summary dict.
"""

import argparse
import json
import pathlib
import sys


METHODS = ("ilqr", "ddp", "projected-gradient", "sgd", "adam")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `control` subcommand on an `argparse` subparsers object."""
    from ..cli import _positive_int
    from ..problems import PROBLEMS

    names = sorted(PROBLEMS)
    parser = subparsers.add_parser(
        "control",
        help="solve a classic optimal-control problem and plot X, u, B",
        description=(
            "Solve a discrete-time optimal-control problem from adjoint.problems and save "
            "a plot of its states X(k), controls u(k), costates B(k) = -dC/dX(k) and "
            "Hamiltonian H(k). Problems: " + ", ".join(names) + "."
        ),
    )
    parser.add_argument(
        "name", metavar="NAME", choices=names, help="the problem, one of: " + ", ".join(names)
    )
    parser.add_argument(
        "--out",
        default=".",
        metavar="DIR",
        help="directory for NAME.png and NAME.json, created if missing (default .)",
    )
    parser.add_argument(
        "--method",
        default="ilqr",
        choices=METHODS,
        help="solver, one of: " + ", ".join(METHODS) + " (default ilqr)",
    )
    parser.add_argument(
        "--horizon", type=_positive_int, default=None, help="N (default: the problem's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial controls")
    parser.add_argument("--max-steps", type=_positive_int, default=None, help="iteration budget")
    parser.add_argument("--x64", action="store_true", help="solve in float64")
    parser.set_defaults(func=run)
    return parser


def _method(name: str, max_steps: int | None):
    import optax

    from . import ILQR, GradientDescent, ProjectedGradient

    kw = {} if max_steps is None else {"max_steps": max_steps}
    if name == "ilqr":
        return ILQR(**kw)
    if name == "ddp":
        return ILQR(second_order=True, **kw)
    if name == "projected-gradient":
        return ProjectedGradient(**kw)
    if name == "sgd":
        return GradientDescent(optax.sgd(1e-2), **kw)
    if name == "adam":
        return GradientDescent(optax.adam(1e-2), **kw)
    raise ValueError(f"unknown method {name!r}; choose one of {METHODS}")


def run(args: argparse.Namespace) -> dict:
    """Solve `args.name` and write `<out>/<name>.png` and `<out>/<name>.json`."""
    from ..cli import _make_out

    _make_out(args.out)  # before the solve: a bad --out is a one-line error at once
    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .. import problems
    from . import solve

    if args.horizon is not None and args.horizon < 1:
        raise ValueError(f"--horizon must be a positive int, got {args.horizon}")
    problem = problems.make(args.name, args.horizon)
    key = jax.random.key(args.seed)
    shape = (problem.horizon, problem.control_size)
    u_init = problem.project(0.01 * jax.random.normal(key, shape, problem.dtype))
    method = _method(args.method, getattr(args, "max_steps", None))
    if problem.constrained:  # general constraints: the method solves each AL subproblem
        from . import AugmentedLagrangian

        method = AugmentedLagrangian(inner=method)
    sol = solve(problem, u_init, method, throw=False)  # the summary reports convergence

    out = pathlib.Path(args.out)

    states = np.asarray(sol.states).reshape(problem.horizon + 1, -1)
    costates = np.asarray(sol.costates).reshape(problem.horizon + 1, -1)
    controls = np.asarray(sol.controls)
    k = np.arange(problem.horizon + 1)
    fig, axes = plt.subplots(4, 1, figsize=(7, 9), sharex=True)
    axes[0].plot(k, states)
    axes[0].set_ylabel("states X(k)")
    axes[1].step(k[:-1], controls, where="post")
    lo, hi = np.asarray(problem.lower), np.asarray(problem.upper)
    for bound in (lo, hi):
        if np.isfinite(bound).any():
            axes[1].plot(k[:-1], bound, "k:", lw=0.8)
    axes[1].set_ylabel("controls u(k)")
    axes[2].plot(k, costates)
    axes[2].set_ylabel("costates B(k)")
    axes[3].plot(k[:-1], np.asarray(sol.kkt.hamiltonian))
    axes[3].set_ylabel("H(k)")
    axes[3].set_xlabel("k")
    fig.suptitle(
        f"{args.name}, {args.method}: C = {float(sol.cost):.6g}, "
        f"{int(sol.num_steps)} iterations, converged = {bool(sol.converged)}"
    )
    fig.tight_layout()
    png = out / f"{args.name}.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    summary = {
        "problem": args.name,
        "method": args.method,
        "horizon": problem.horizon,
        "dtype": str(problem.dtype),
        "cost": float(sol.cost),
        "iterations": int(sol.num_steps),
        "converged": bool(sol.converged),
        "message": sol.message,
        "final_state": states[-1].tolist(),
        "kkt": sol.kkt.summary(),
        "plot": str(png),
    }
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=2))
    print(
        f"{args.name}: C = {summary['cost']:.6g} after {summary['iterations']} iterations "
        f"({'converged' if summary['converged'] else 'NOT converged'}: {summary['message']}); "
        f"plot in {png}"
    )
    return summary


def main(argv=None) -> int:
    """Stand-alone entry (`python -m adjoint.control.cli NAME ...`): the same as
    `adjoint control NAME ...`, one-line errors included; returns the exit status."""
    from ..cli import main as cli_main

    return cli_main(["control", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
