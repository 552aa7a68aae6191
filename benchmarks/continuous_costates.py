"""Continuous-time costates: exact O(1)-memory gradients of ODE solves against diffrax's
adjoints.

    python -m benchmarks.continuous_costates [--quick]

Problem (issue 16's sizes): dX/dt = tanh(W X + b), n = 128, a batch of 64 initial states,
float32, N = 100, 1,000 and 10,000 fixed steps on [0, 1], C = Σ_p |D_p − X_p(1)|². We time
`jax.jit` of the forward solve with Tsit5 (the unit), the forward of the reversible
scheme Reversible(Tsit5), and dC/d(W, b) by

- `ReversibleAdjoint · Reversible(Tsit5)` (ours, `adjoint.trajectory_cost`'s default):
  the discrete costate recursion of the reversible scheme, each step reconstructed
  exactly from the next (route (a) of the issue), O(1) memory;
- `ReversibleAdjoint · Reversible(Midpoint)` (ours): the same with a cheaper base;
- `optimise-then-discretise (costate ODE)`: `trajectory_cost(mode=...)`, the backward
  costate ODE with Tsit5 (what `costate_ode` did before);
- `BacksolveAdjoint`, `RecursiveCheckpointAdjoint` (diffrax's default checkpoints),
  `RecursiveCheckpointAdjoint, store all` (`checkpoints=N`: the discrete costate
  recursion over every stored step state, route (b) at an unlimited budget; diffrax's
  checkpointed loop is the binomial (optimal) schedule for smaller budgets), and
  `DirectAdjoint` (N ≤ 1,000 only: at 10,000 steps it takes minutes to compile).

Times are interleaved (A B C … A B C …) after a warm-up, with `block_until_ready`; the
"× forward" columns are medians over rounds of the per-round ratio to the forward in the
same round. Memory is XLA's compiled temp bytes. The steps end at t_n = n/N rounded to
float32 (`diffrax.StepTo`; constant steps of 1/N for the two backsolves, which cannot
run `StepTo` backward). "gap" is max |g − g_ref| / max |g_ref| against the float64
gradient of the same solver's discrete C on the same time grid (the exact gradient of
what float32 computes approximately): each method's float32 round-off, which
`RecursiveCheckpointAdjoint`'s own row puts in scale; "gap to Tsit5" against that of
Tsit5; "gap to continuous" against the gradient of the continuous problem (Tsit5, 4,000
steps, float64): what each method's accuracy buys, so that cheaper bases can be compared
at equal time.

The sizes can be run one at a time (`--steps 10000`), each merged into the results file.
"""

import argparse
import json
import statistics

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

import adjoint as adj

from . import _common
from ._common import _interleaved_times, compiled_memory, md_table, metadata, write_results


FORWARD = "forward solve"
OURS = "ReversibleAdjoint · Reversible(Tsit5) (ours)"
OURS_MIDPOINT = "ReversibleAdjoint · Reversible(Midpoint) (ours)"
OTD = "optimise-then-discretise (costate ODE)"


def _vector_field(t, x, params):
    w, b = params
    return jnp.tanh(x @ w.T + b)


def _problem(n, batch):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    w = jax.random.normal(k1, (n, n), jnp.float32) / n**0.5
    b = 0.1 * jax.random.normal(k2, (n,), jnp.float32)
    x0 = jax.random.normal(k3, (batch, n), jnp.float32)
    target = 0.5 * jax.random.normal(k4, (batch, n), jnp.float32)
    return (w, b), x0, target


def _continuous_reference(n, batch, steps=4000):
    """dC/d(W, b) of the continuous problem: Tsit5 with `steps` steps in float64 (its
    O(h⁵) error is far below float32 round-off), the reference of the "gap to
    continuous" column."""
    problem = _problem(n, batch)  # the float32 problem, in float64
    with jax.enable_x64(True):
        params, x0, target = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), problem)

        def cost(params):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(_vector_field),
                diffrax.Tsit5(),
                0.0,
                1.0,
                1.0 / steps,
                x0,
                args=params,
                saveat=diffrax.SaveAt(t1=True),
                max_steps=steps,
            )
            return jnp.sum((target - sol.ys[-1]) ** 2)

        return [np.asarray(g) for g in jax.jit(jax.grad(cost))(params)]


def _one_size(n, batch, steps, repeats, direct, continuous):
    params, x0, target = _problem(n, batch)
    # The step times t_n = n/N rounded to float32 once each (`StepTo`), so that the
    # float64 references below run the very same discrete scheme.
    ts = np.linspace(0.0, 1.0, steps + 1).astype(np.float32)
    steps_to = diffrax.StepTo(ts=jnp.asarray(ts))

    def terminal(x):
        return jnp.sum((target - x) ** 2)

    def cost(solver, adjoint, target=target, controller=steps_to):
        # `BacksolveAdjoint` cannot run `StepTo` backward: constant steps of 1/N for it.
        constant = isinstance(adjoint, diffrax.BacksolveAdjoint)
        if constant:
            controller = diffrax.ConstantStepSize()

        def c(params, x0):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(_vector_field),
                solver,
                0.0 if constant else controller.ts[0],
                1.0 if constant else controller.ts[-1],
                1.0 / steps if constant else None,
                x0,
                args=params,
                saveat=diffrax.SaveAt(t1=True),
                stepsize_controller=controller,
                adjoint=adjoint,
                max_steps=steps,
            )
            return jnp.sum((target - sol.ys[-1]) ** 2)

        return c

    def exact(solver):
        """The float64 gradient of the same scheme on the same time grid
        (`RecursiveCheckpointAdjoint`): what a float32 gradient should be."""
        with jax.enable_x64(True):
            p64, x64, t64 = jax.tree.map(
                lambda a: jnp.asarray(a, jnp.float64), (params, x0, target)
            )
            controller = diffrax.StepTo(ts=jnp.asarray(ts, jnp.float64))
            c = cost(solver, diffrax.RecursiveCheckpointAdjoint(), t64, controller)
            return [np.asarray(g) for g in jax.jit(jax.grad(c))(p64, x64)]

    tsit5, rev_tsit5 = diffrax.Tsit5(), adj.Reversible(diffrax.Tsit5())
    rev_mid = adj.Reversible(diffrax.Midpoint())
    rc = diffrax.RecursiveCheckpointAdjoint()
    kwargs = dict(
        t0=float(ts[0]),
        t1=float(ts[-1]),
        stepsize_controller=steps_to,
        terminal_cost=terminal,
        max_steps=steps,
    )
    fns = {
        FORWARD: cost(tsit5, rc),
        "forward solve, Reversible(Tsit5)": cost(rev_tsit5, rc),
        OURS: jax.grad(lambda p, x: adj.trajectory_cost(_vector_field, p, x, **kwargs)),
        OURS_MIDPOINT: jax.grad(cost(rev_mid, adj.ReversibleAdjoint())),
        OTD: jax.grad(
            lambda p, x: adj.trajectory_cost(
                _vector_field,
                p,
                x,
                mode="optimise-then-discretise",
                **dict(kwargs, stepsize_controller=None, dt0=1.0 / steps),
            )
        ),
        "BacksolveAdjoint": jax.grad(cost(tsit5, diffrax.BacksolveAdjoint())),
        "RecursiveCheckpointAdjoint": jax.grad(cost(tsit5, rc)),
        "RecursiveCheckpointAdjoint, store all": jax.grad(
            cost(tsit5, diffrax.RecursiveCheckpointAdjoint(checkpoints=steps))
        ),
    }
    if direct:
        fns["DirectAdjoint"] = jax.grad(cost(tsit5, diffrax.DirectAdjoint()))
    fns = {name: jax.jit(f) for name, f in fns.items()}
    memory = {name: compiled_memory(f, params, x0) for name, f in fns.items()}
    times = _interleaved_times({k: (lambda f=f: f(params, x0)) for k, f in fns.items()}, repeats)

    references = {
        "Tsit5": exact(tsit5),
        "Reversible(Tsit5)": exact(rev_tsit5),
        "Reversible(Midpoint)": exact(rev_mid),
    }
    same_solver = {OURS: "Reversible(Tsit5)", OURS_MIDPOINT: "Reversible(Midpoint)"}

    def rel(g, reference):
        return max(
            float(np.max(np.abs(np.asarray(a, r.dtype) - r)) / np.max(np.abs(r)))
            for a, r in zip(g, (np.asarray(r) for r in reference))
        )

    rows = []
    for name, f in fns.items():
        grads = None if name.startswith(FORWARD) else f(params, x0)
        solver = same_solver.get(name, "Tsit5")
        rows.append(
            {
                "method": name,
                "times_s": times[name],
                "median_s": statistics.median(times[name]),
                "x_forward": statistics.median(a / b for a, b in zip(times[name], times[FORWARD])),
                "x_own_forward": statistics.median(
                    a / b
                    for a, b in zip(
                        times[name],
                        times[
                            "forward solve, Reversible(Tsit5)"
                            if solver == "Reversible(Tsit5)"
                            else FORWARD
                        ],
                    )
                ),
                "temp_MB": memory[name].get("temp_bytes", float("nan")) / 2**20,
                "gap_same_solver": None if grads is None else rel(grads, references[solver]),
                "reference_solver": None if grads is None else solver,
                "gap_to_tsit5": None if grads is None else rel(grads, references["Tsit5"]),
                "gap_to_continuous": None if grads is None else rel(grads, continuous),
            }
        )
    # float32's own round-off on the reversible schemes: diffrax's
    # `RecursiveCheckpointAdjoint` on the same solver (untimed), against the same reference
    floor = {
        solver: rel(jax.jit(jax.grad(cost(reversible, rc)))(params, x0), references[solver])
        for solver, reversible in (
            ("Reversible(Tsit5)", rev_tsit5),
            ("Reversible(Midpoint)", rev_mid),
        )
    }
    return {"steps": steps, "rows": rows, "recursive_checkpoint_float32_gap": floor}


def _targets(results) -> dict:
    by_steps = {r["steps"]: {row["method"]: row for row in r["rows"]} for r in results}
    mid = by_steps[sorted(by_steps)[len(by_steps) // 2]]  # N = 1,000 in the full run
    ours, backsolve = mid[OURS], mid["BacksolveAdjoint"]
    floor = next(r for r in results if r["steps"] == sorted(by_steps)[len(by_steps) // 2])[
        "recursive_checkpoint_float32_gap"
    ]
    first, last = by_steps[min(by_steps)], by_steps[max(by_steps)]
    return {
        "steps": sorted(by_steps)[len(by_steps) // 2],
        "ours_x_forward": ours["x_forward"],
        "ours_x_own_forward": ours["x_own_forward"],
        "ours_le_3x_forward": ours["x_forward"] <= 3.0,
        "midpoint_x_forward": mid[OURS_MIDPOINT]["x_forward"],
        "midpoint_le_3x_forward": mid[OURS_MIDPOINT]["x_forward"] <= 3.0,
        "ours_gap": ours["gap_same_solver"],
        "recursive_checkpoint_same_scheme_gap": floor["Reversible(Tsit5)"],
        "ours_gap_within_1.5x_recursive_checkpoint": ours["gap_same_solver"]
        <= 1.5 * floor["Reversible(Tsit5)"],
        "gap_le_1e-6": max(ours["gap_same_solver"], mid[OURS_MIDPOINT]["gap_same_solver"]) <= 1e-6,
        "memory_within_2x_backsolve": max(ours["temp_MB"], mid[OURS_MIDPOINT]["temp_MB"])
        <= 2 * backsolve["temp_MB"],
        "memory_flat_in_N": last[OURS]["temp_MB"] <= 1.1 * first[OURS]["temp_MB"],
    }


def run(quick: bool = False, steps: tuple[int, ...] | None = None) -> dict:
    """Run every size, or only `steps` (merged into the results file already written,
    so that the sizes of a full run can be measured in separate processes)."""
    n, batch = (32, 8) if quick else (128, 64)
    sizes = (20, 200) if quick else (100, 1000, 10000)
    name = "continuous_costates_quick" if quick else "continuous_costates"
    continuous = _continuous_reference(n, batch)
    results = [
        _one_size(
            n,
            batch,
            N,
            repeats=3 if quick or N > 1000 else 5,
            direct=N <= 1000,
            continuous=continuous,
        )
        for N in (sizes if steps is None else steps)
    ]
    if steps is not None:
        previous = json.loads((_common.RESULTS / f"{name}.json").read_text()).get("results", [])
        kept = [r for r in previous if r["steps"] not in steps and r["steps"] in sizes]
        results = sorted(kept + results, key=lambda r: r["steps"])
    targets = _targets(results)
    data = {
        "meta": metadata(),
        "quick": quick,
        "sizes": {
            "n": n,
            "batch": batch,
            "steps": [r["steps"] for r in results],
            "dtype": "float32",
        },
        "diffrax": diffrax.__version__,
        "results": results,
        "targets": targets,
    }
    meta = data["meta"]
    md = [
        f"# Continuous-time costates{' (quick)' if quick else ''}",
        "",
        f"{meta['date']} · {meta['device']} ({meta['cpu_count']} cores) · jax {meta['jax']} · "
        f"diffrax {diffrax.__version__} · dX/dt = tanh(W X + b), n = {n}, batch = {batch}, "
        "float32, N fixed steps on [0, 1] (t_n = n/N in float32) · medians of per-round "
        "ratios to the Tsit5 forward (× own forward: to the forward of the same solver) · "
        "gap: relative to the float64 gradient of the same solver's discrete solve on the "
        "same time grid (so RecursiveCheckpointAdjoint's row is float32's own round-off); "
        "gap to continuous: relative to the float64 gradient of the continuous problem "
        "(Tsit5, 4,000 steps).",
    ]
    for result in results:
        md += [
            "",
            f"## N = {result['steps']:,} steps",
            "",
            md_table(
                [
                    "method",
                    "median (ms)",
                    "× forward",
                    "× own forward",
                    "XLA temp (MB)",
                    "gap (same solver)",
                    "gap to Tsit5",
                    "gap to continuous",
                ],
                [
                    [
                        r["method"],
                        r["median_s"] * 1e3,
                        r["x_forward"],
                        r["x_own_forward"],
                        r["temp_MB"],
                        "—" if r["gap_same_solver"] is None else r["gap_same_solver"],
                        "—" if r["gap_to_tsit5"] is None else r["gap_to_tsit5"],
                        "—" if r.get("gap_to_continuous") is None else r["gap_to_continuous"],
                    ]
                    for r in result["rows"]
                ],
            ),
            "",
            "float32 `RecursiveCheckpointAdjoint` on the reversible schemes (untimed), the "
            "round-off floor for the two rows of ours: gap "
            + ", ".join(
                f"{g:.3g} on {solver}"
                for solver, g in result.get("recursive_checkpoint_float32_gap", {}).items()
            )
            + ".",
        ]
    md += [
        "",
        f"Targets at N = {targets['steps']:,}: "
        + ", ".join(
            f"{k} = {v:.3g}" if isinstance(v, float) else f"{k}: {'met' if v else 'MISSED'}"
            for k, v in targets.items()
            if k != "steps"
        ),
    ]
    write_results(name, data, "\n".join(md))
    print("\n".join(md))
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a minute on a CPU")
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        help="measure only these N and merge them into the results already written",
    )
    args = parser.parse_args(argv)
    run(quick=args.quick, steps=None if args.steps is None else tuple(args.steps))


if __name__ == "__main__":
    main()
