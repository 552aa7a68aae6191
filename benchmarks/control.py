"""Time to reach a cost tolerance on the pendulum and cart-pole swing-ups.

For each problem (`adjoint.problems.pendulum`, `cartpole`: fixed durations 5 s and 3 s,
discretised with N steps) and each method, the wall time until C ≤ C_best (1 + 10⁻³),
where C_best is the lowest cost any method found. Methods: iLQR (Gauss–Newton) and DDP
(`adjoint.control.ILQR`, box-constrained), spectral projected gradient, the paper's
steepest descent (`GradientDescent(optax.sgd(η))`, η the best of a small sweep), and
`scipy.optimize.minimize(method="L-BFGS-B")` on the same discretised problem with the
gradient from `jax.grad` (the core's costate recursion, jitted). float64, u_init = 0.

The `adjoint` solvers run as one jitted `while_loop`; to time them to the tolerance
they are run again with `cost_target` = the target (an array, so nothing recompiles).
L-BFGS-B is timed from its start to the first iteration whose cost is below the target.
All methods are timed interleaved after warm-up (one run of each per round); the
speed-ups are medians of the per-round ratios. A method that never gets there within
its budget is reported as "not reached" with the time its budget took (one round).

    python -m benchmarks.control [--quick] [--sizes N ...] [--problems NAME ...]
"""

import argparse
import os
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._common import interleaved_ratios, md_table, metadata, write_results


RTOL = 1e-3


def _methods(N: int, quick: bool):
    from adjoint import control

    budget_2nd = 300 if quick else 1000
    budget_1st = 20_000 if quick else 50_000
    inf = jnp.asarray(-jnp.inf)
    return {
        "ilqr": lambda t=inf: control.ILQR(max_steps=budget_2nd, cost_target=t),
        "ddp": lambda t=inf: control.ILQR(second_order=True, max_steps=budget_2nd, cost_target=t),
        "projected_gradient": lambda t=inf: control.ProjectedGradient(
            max_steps=budget_1st, cost_target=t
        ),
    }, budget_1st


def _sgd(lr: float, budget: int, target):
    from adjoint import control

    return control.GradientDescent(optax.sgd(lr), max_steps=budget, cost_target=target)


_run = eqx.filter_jit(lambda problem, u0, method: method.run(problem, u0, 1e-10))


def _wall_time(problem, u0, method):
    """A zero-argument function: one run of `method` (compiled and warmed up here), its
    wall time in seconds."""
    jax.block_until_ready(_run(problem, u0, method))

    def once():
        t0 = time.perf_counter()
        jax.block_until_ready(_run(problem, u0, method))
        return time.perf_counter() - t0

    return once


def _lbfgsb(problem, budget: int, target: float | None):
    """SciPy's L-BFGS-B on the discretised problem, gradient by `jax.grad` (jitted).

    **Returns:** `(summary of one run, time_to_target)`, the latter a zero-argument
    function that runs it again and returns its wall time to C ≤ target."""
    from scipy.optimize import minimize

    N, m = problem.horizon, problem.control_size
    vg = jax.jit(jax.value_and_grad(lambda u: problem.cost(u.reshape(N, m))))
    bounds = list(
        zip(
            np.where(np.isfinite(problem.lower), problem.lower, -np.inf).ravel(),
            np.where(np.isfinite(problem.upper), problem.upper, np.inf).ravel(),
        )
    )
    x0 = np.zeros(N * m)

    def fun(x):
        v, g = vg(jnp.asarray(x))
        return float(v), np.asarray(g, np.float64)

    fun(x0)  # compile

    def once():
        trace = []
        t0 = time.perf_counter()

        def callback(intermediate_result):
            trace.append((time.perf_counter() - t0, float(intermediate_result.fun)))

        res = minimize(
            fun,
            x0,
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            callback=callback,
            options={"maxiter": budget, "maxfun": 2 * budget, "ftol": 1e-13, "gtol": 1e-9},
        )
        return res, trace, time.perf_counter() - t0

    def time_to_target():
        """One run's time to the first iterate with C ≤ target (its whole time if none)."""
        _, trace, total = once()
        return next((t for t, c in trace if c <= target), total)

    res, trace, total = once()
    out = {"final_cost": float(res.fun), "iterations": int(res.nit), "total_s": total}
    if target is not None:
        hit = next((i for i, (_, c) in enumerate(trace) if c <= target), None)
        out["reached"] = hit is not None
        out["iterations_to_target"] = None if hit is None else hit + 1
    return out, time_to_target


def _bench_problem(name: str, N: int, quick: bool) -> dict:
    from adjoint import problems

    problem = problems.make(name, N)
    u0 = jnp.zeros((N, 1))
    repeats = 3 if quick else 5
    factories, budget_1st = _methods(N, quick)
    # 1. reference runs: full budgets, cost histories
    finals, histories = {}, {}
    for meth, make in factories.items():
        _, hist, it, res = _run(problem, u0, make())
        h = np.asarray(hist)[: int(it) + 1]
        finals[meth], histories[meth] = float(h[-1]), h
    # the paper's steepest descent: best step of a small sweep (η scaled with N: dC/du ∝ 1/N)
    sweep = (0.03,) if quick else (0.1, 0.03)
    best_lr, best_final = None, np.inf
    for c in sweep:
        lr = c * N / 100
        _, hist, it, _ = _run(problem, u0, _sgd(lr, budget_1st, jnp.asarray(-jnp.inf)))
        h = np.asarray(hist)[: int(it) + 1]
        if np.isfinite(h[-1]) and h[-1] < best_final:
            best_lr, best_final, best_hist = lr, float(h[-1]), h
    finals["steepest_descent"], histories["steepest_descent"] = best_final, best_hist
    lb_budget = 3_000 if quick else 20_000
    lb, _ = _lbfgsb(problem, lb_budget, None)
    finals["lbfgsb"] = lb["final_cost"]
    c_best = min(finals.values())
    target = c_best + RTOL * abs(c_best)

    # 2. runs to the target, timed interleaved: one run of every method per round
    rows, timers = {}, {}
    for meth in list(factories) + ["steepest_descent"]:
        if meth == "steepest_descent":
            method = _sgd(best_lr, budget_1st, jnp.asarray(target))
        else:
            method = factories[meth](jnp.asarray(target))
        hits = np.nonzero(histories[meth] <= target)[0]
        rows[meth] = {
            "reached": bool(hits.size),
            "iterations_to_target": int(hits[0]) if hits.size else None,
            "iterations_total": int(histories[meth].size - 1),
            "final_cost": finals[meth],
        }
        timers[meth] = _wall_time(problem, u0, method)
    rows["steepest_descent"]["learning_rate"] = best_lr
    rows["lbfgsb"], timers["lbfgsb"] = _lbfgsb(problem, lb_budget, target)
    # a method that never reaches the target is timed in one round only: its whole
    # budget, a lower bound on its time to target
    times = {meth: [] for meth in rows}
    for r in range(repeats):
        for meth, timer in timers.items():
            if r == 0 or rows[meth]["reached"]:
                times[meth].append(timer())
    for meth, ts in times.items():
        rows[meth]["time_s"] = statistics.median(ts)
        rows[meth]["times_s"] = ts
    for meth in ("ilqr", "ddp"):
        for base in ("lbfgsb", "steepest_descent"):
            # per-round ratios when both reach the target; when the baseline does not,
            # its budget over our median (a lower bound); when this method does not, none
            ok, both = rows[meth]["reached"], rows[base]["reached"]
            if ok and both:
                rounds = zip(times[base], times[meth])
                speedup = statistics.median(b / a for b, a in rounds)
            else:
                speedup = rows[base]["time_s"] / rows[meth]["time_s"] if ok else None
            rows[meth][f"speedup_vs_{base}"] = speedup
            rows[meth][f"speedup_vs_{base}_is_lower_bound"] = not both
    return {"problem": name, "N": N, "c_best": c_best, "target": target, "methods": rows}


# --------------------------------------------------------------------------- trajax
# `trajax.optimizers.ilqr` (Gauss–Newton iLQR, no control bounds) against `ILQR()` on the
# same unbounded problems from the same u_init = 0, each timed to the same objective.
TRAJAX_PROBLEMS = (("acrobot", 50), ("pendulum", 300), ("cartpole", 100))


def _trajax_available() -> bool:
    try:
        import trajax.optimizers  # noqa: F401  (a local checkout: not on the package index)
    except ImportError:
        return False
    return True


def _trajax_solver(problem):
    """trajax's ilqr on `problem` (t = 0..N, the terminal cost at t = N), jitted with
    `maxiter` traced: one compilation for every iteration budget."""
    from trajax import optimizers

    N = problem.horizon

    def cost(x, u, t):
        return jnp.where(t == N, problem.phi(x), problem.ell(x, u, jnp.minimum(t, N - 1)))

    def dynamics(x, u, t):
        return problem.f(x, u, t)

    @jax.jit
    def solve(U, maxiter):
        out = optimizers.ilqr(
            cost, dynamics, problem.x0[0], U, maxiter=maxiter, grad_norm_threshold=0.0
        )
        return out[1], out[2], out[6]  # U, objective, iterations

    return solve


def _bench_trajax(name: str, N: int, repeats: int, budget: int) -> dict:
    from adjoint import control, problems
    from adjoint.control import _solve

    problem = getattr(problems, name)(N, u_max=None)  # trajax's ilqr has no bounds
    u0 = jnp.zeros((N, 1))
    trajax_solve = _trajax_solver(problem)
    ours_full = control.ILQR(max_steps=budget, cost_target=jnp.asarray(-jnp.inf))
    _, hist, it, _ = _run(problem, u0, ours_full)
    ours_final = float(np.asarray(hist)[int(it)])
    trajax_final = float(trajax_solve(u0, budget)[1])
    c_best = min(ours_final, trajax_final)
    target = c_best + RTOL * abs(c_best)
    # trajax's fewest iterations to the target: its objective is monotone in maxiter
    if trajax_final > target:
        trajax_iters = None
    else:
        lo, hi = 0, budget
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if float(trajax_solve(u0, mid)[1]) <= target else (mid, hi)
        trajax_iters = hi
    ours = control.ILQR(max_steps=budget, cost_target=jnp.asarray(target))
    _, hist, it, result = _run(problem, u0, ours)
    ours_iters = int(it)
    fixed = _solve._constant(problem)
    u, history, iterations, result, gtol = _solve._run(fixed, u0, ours, 1e-8)
    fns = {
        "ours_iterations": lambda: _solve._run(fixed, u0, ours, 1e-8),
        "ours_analysis": lambda: _solve._finish(
            problem, u, history, iterations, result, 1e-8, gtol, True, False
        ),
        "ours_solve": lambda: control.solve(problem, u0, ours, throw=False).controls,
    }
    if trajax_iters is not None:
        fns["trajax"] = lambda: trajax_solve(u0, trajax_iters)
        pairs = {
            "iterations/trajax": ("ours_iterations", "trajax"),
            "solve/trajax": ("ours_solve", "trajax"),
        }
    else:
        pairs = {}
    timed = interleaved_ratios(fns, repeats, pairs)
    return {
        "problem": name,
        "N": N,
        "c_best": c_best,
        "target": target,
        "ours_final": ours_final,
        "trajax_final": trajax_final,
        "ours_iterations_to_target": ours_iters,
        "trajax_iterations_to_target": trajax_iters,
        **timed,
    }


def _trajax_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        t, ratio = r["median_s"], r["ratio"]
        fmt = lambda x: f"{1e3 * x:.3g}"
        body.append(
            [
                r["problem"],
                r["N"],
                r["ours_iterations_to_target"],
                r["trajax_iterations_to_target"] or "not reached",
                fmt(t["ours_iterations"]),
                fmt(t["ours_analysis"]),
                fmt(t["ours_solve"]),
                fmt(t["trajax"]) if "trajax" in t else "-",
                f"{ratio['iterations/trajax']:.2f}×" if ratio else "-",
                f"{ratio['solve/trajax']:.2f}×" if ratio else "-",
            ]
        )
    return md_table(
        [
            "problem (no bounds)",
            "N",
            "iterations (ours)",
            "iterations (trajax)",
            "ours: iterations (ms)",
            "ours: analysis (ms)",
            "ours: `solve` (ms)",
            "trajax `ilqr` (ms)",
            "iterations / trajax",
            "`solve` / trajax",
        ],
        body,
    )


def run(quick: bool = False, sizes=None, names=None) -> dict:
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        sizes = sizes or ((100,) if quick else (100, 200, 500))
        names = names or ("pendulum", "cartpole") + (() if quick else ("acrobot", "trajax"))
        results = [
            _bench_problem(name, N, quick)
            for name in names
            if name in ("pendulum", "cartpole")
            for N in sizes
        ]
        if "acrobot" in names:
            results.append(_bench_problem("acrobot", 50, quick))
        trajax = []
        if _trajax_available() and (quick or "trajax" in names):
            cases = TRAJAX_PROBLEMS[:1] if quick else TRAJAX_PROBLEMS
            trajax = [_bench_trajax(n, N, 5 if quick else 9, 1000) for n, N in cases]
    finally:
        jax.config.update("jax_enable_x64", previous)
    meta = metadata()
    meta["load_average_1min_at_end"] = os.getloadavg()[0]
    data = {"meta": meta, "quick": quick, "rtol": RTOL, "results": results, "trajax": trajax}

    def ratio(v, base):
        x = v.get(f"speedup_vs_{base}")
        if x is None:
            return ""
        return ("≥ " if v[f"speedup_vs_{base}_is_lower_bound"] else "") + f"{x:.2g}×"

    rows = []
    for r in results:
        for meth, v in r["methods"].items():
            reached = v["reached"]
            rows.append(
                [
                    r["problem"],
                    r["N"],
                    meth,
                    f"{v['time_s']:.3g}" if reached else f"> {v['time_s']:.3g} (not reached)",
                    v.get("iterations_to_target") or "-",
                    f"{v['final_cost']:.6g}",
                    ratio(v, "lbfgsb"),
                    ratio(v, "steepest_descent"),
                ]
            )
    md = "\n".join(
        [
            f"# Optimal control: time to reach C ≤ C_best (1 + {RTOL:g})"
            + (" (quick)" if quick else ""),
            "",
            f"{meta['date']}; {meta['device']} ({meta['cpu_count']} cores, shared); "
            f"jax {meta['jax']}; float64; u_init = 0; pendulum (5 s, |u| ≤ 5) and cart-pole "
            "(3 s, |u| ≤ 10) swing-ups discretised with N steps.",
            "",
            "Target of the issue: the second-order method at least 5× faster than L-BFGS-B "
            "and 20× faster than steepest descent. Times: medians over rounds run "
            "interleaved after warm-up (one run of every method per round); speed-ups: "
            "medians of the per-round ratios.",
            "",
            md_table(
                [
                    "problem",
                    "N",
                    "method",
                    "time to target (s)",
                    "iterations",
                    "final cost",
                    "speed-up vs L-BFGS-B",
                    "vs steepest descent",
                ],
                rows,
            ),
            "",
            "C_best / target per problem: "
            + "; ".join(
                f"{r['problem']} N={r['N']}: {r['c_best']:.6g} / {r['target']:.6g}" for r in results
            ),
            "",
            "## Against trajax",
            "",
            (
                "`trajax.optimizers.ilqr` (a local source checkout; Gauss–Newton iLQR without "
                "control bounds) and `ILQR()` on the same problems without bounds, u_init = 0, "
                "each to C ≤ C_best (1 + 10⁻³) (trajax with its fewest `maxiter` that gets "
                "there, ours with `cost_target`). Times are medians of interleaved rounds "
                "(A B A B …, after warm-up); the ratios are medians of the per-round ratios. "
                "'iterations' = the compiled loop of `ILQR` (what `solve` runs first), "
                "'analysis' = the second compiled piece of `solve` (KKT / Pontryagin check, "
                "Riccati gains of the implicit derivative), '`solve`' = the whole call. Goal "
                "of the issue: ≤ 0.7× trajax's time."
                if trajax
                else "trajax is not importable here: the column is left out."
            ),
            "",
            _trajax_table(trajax) if trajax else "",
            "",
            "Steepest descent = `GradientDescent(optax.sgd(η))` with η the best of a sweep "
            "(learning rates: "
            + ", ".join(
                f"{r['problem']} N={r['N']}: {r['methods']['steepest_descent']['learning_rate']:g}"
                for r in results
            )
            + "). A time marked 'not reached' is the whole budget; the speed-up is then a "
            "lower bound (≥). The machine is shared with other jobs (1-min load average "
            f"{meta['load_average_1min_at_end']:.1f} on 2 cores at the end of this run): "
            "single timings can be several times slower than on an idle machine.",
        ]
    )
    write_results("control_quick" if quick else "control", data, md)
    return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="horizons N")
    parser.add_argument(
        "--problems",
        nargs="+",
        default=None,
        choices=("pendulum", "cartpole", "acrobot", "trajax"),
        help="which tables to run (default: all)",
    )
    args = parser.parse_args()
    out = run(quick=args.quick, sizes=args.sizes, names=args.problems)
    print(
        open(
            __import__("pathlib").Path(__file__).parent
            / "results"
            / ("control_quick.md" if args.quick else "control.md")
        ).read()
    )
