"""CTRNN (Pineda–Almeida): the implicit gradient against the alternatives.

    python -m benchmarks.ctrnn [--quick]

Problem (the issue's sizes): τ dX/dt = tanh(W X + b + I) − X, n = 256 units, a batch of
64 patterns, float32, W scaled to spectral norm 0.5, C = Σ_p |D_p − X*_p|². Each method
returns dC/d(W, b); we time `jax.jit(jax.grad(C))` (interleaved repeats A B C … after a
warm-up, `block_until_ready`; each ratio is the median over the rounds of the ratio of
the two times in the same round) and read XLA's compiled memory (temp bytes). Every
tolerance is `CTRNN.default_tol(float32)` = 100 eps = 1.2e-5, the library's default.

- `unrolled T`: back-propagation through T steps of X ← tanh(W X + b + I) (`lax.scan`).
- `CTRNN() defaults`: `adjoint.CTRNN(weight=W, bias=b)` with nothing else set, i.e.
  `FixedPointSolve()` + `FixedPointAdjoint()` at the dtype's default tolerance.
- `implicit (fixed point)`: `FixedPointSolve` + `FixedPointAdjoint` with an explicit
  `optx.FixedPointIteration` (optimistix iterations X ← F(W X + b + I) and
  B ← Wᵀ F'ᵀ B − ∂Cᵀ/∂X on the batch): the lean implicit path, spelled out.
- `implicit (diffrax Pineda)`: `Relaxation` + `PinedaAdjoint` (Tsit5), the named
  options that converge wherever the fixed point is an attractor (the defaults until
  issue 13).
- `implicit (lineax LU)`: `FixedPointSolve` + `LinearSolveAdjoint()` (one n×n LU per pattern).
- `optimistix whole batch`: `optx.fixed_point(..., adjoint=optx.ImplicitAdjoint(...))` on
  the (64, 256) batch; with its default linear solver the Jacobian is a (P n)² = 16384²
  matrix, so only its compiled memory is read; timed with `lx.GMRES` instead.
- `optimistix vmapped`: the same per pattern under `jax.vmap` (one n×n solve each): the
  fair generic baseline.
- `diffrax ImplicitAdjoint vmapped`: `diffeqsolve` to a steady state (`steady_state_event`)
  with `diffrax.ImplicitAdjoint()`, per pattern under `jax.vmap`.

Targets (issue 5): memory flat in T and under 5 MB; time ≤ 0.15× unrolled at T = 200;
≥ 5× faster than the vmapped optimistix path. Issue 13, for `CTRNN()` at its defaults:
≤ 0.05× unrolled at T = 200 and ≥ 10× faster than optimistix vmapped.
"""

import argparse
import statistics
import time

import diffrax
import jax
import jax.numpy as jnp
import lineax as lx
import optimistix as optx

import adjoint as adj

from ._common import (
    compiled_memory,
    interleaved_ratios,
    md_table,
    metadata,
    save_figure,
    write_results,
)


TOL = adj.CTRNN.default_tol(jnp.float32)  # every method stops where the defaults do


def _problem(n, batch, key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    w = jax.random.normal(k1, (n, n), jnp.float32)
    w = w * (0.5 / jnp.linalg.norm(w, ord=2))
    b = 0.1 * jax.random.normal(k2, (n,), jnp.float32)
    inputs = jax.random.normal(k3, (batch, n), jnp.float32)
    target = 0.5 * jax.random.normal(k4, (batch, n), jnp.float32)
    return (w, b), inputs, target


def _ctrnn_cost(forward=None, adjoint=None):
    """C through `adjoint.CTRNN`, with the given strategies or (None) its defaults."""
    strategies = {k: v for k, v in (("forward", forward), ("adjoint", adjoint)) if v is not None}

    def cost(params, inputs, target):
        w, b = params
        net = adj.CTRNN(weight=w, bias=b, **strategies)
        return jnp.sum((target - net(inputs)) ** 2)

    return cost


def _unrolled_cost(steps):
    def cost(params, inputs, target):
        w, b = params
        net = adj.CTRNN(weight=w, bias=b)
        return jnp.sum((target - net.unrolled(inputs, steps)) ** 2)

    return cost


def _map(x, args):
    w, b, inputs = args
    return jnp.tanh(x @ w.T + b + inputs)


def _optx_cost(linear_solver=None, vmapped=False):
    solver = optx.FixedPointIteration(rtol=TOL, atol=TOL)
    adjoint = (
        optx.ImplicitAdjoint()
        if linear_solver is None
        else optx.ImplicitAdjoint(linear_solver=linear_solver)
    )

    def fixed_point(w, b, inputs):
        return optx.fixed_point(
            _map, solver, jnp.zeros_like(inputs), (w, b, inputs), adjoint=adjoint, max_steps=256
        ).value

    def cost(params, inputs, target):
        w, b = params
        if vmapped:
            x = jax.vmap(fixed_point, in_axes=(None, None, 0))(w, b, inputs)
        else:
            x = fixed_point(w, b, inputs)
        return jnp.sum((target - x) ** 2)

    return cost


def _diffrax_cost(params, inputs, target):
    w, b = params

    def steady(i):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, x, args: _map(x, args) - x),
            diffrax.Tsit5(),
            t0=jnp.float32(0),
            t1=jnp.float32(jnp.inf),
            dt0=None,
            y0=jnp.zeros_like(i),
            args=(w, b, i),
            stepsize_controller=diffrax.PIDController(rtol=TOL, atol=TOL, dtmax=1.5),
            event=diffrax.Event(diffrax.steady_state_event()),
            adjoint=diffrax.ImplicitAdjoint(),
            max_steps=4096,
        )
        return sol.ys[-1]

    return jnp.sum((target - jax.vmap(steady)(inputs)) ** 2)


def _calls_per_timing(grad, args, quick: bool, target_s: float = 0.2) -> int:
    """How many back-to-back calls of `grad` take about `target_s` (1 in quick runs)."""
    if quick:
        return 1
    jax.block_until_ready(grad(*args))  # compiled
    t0 = time.perf_counter()
    jax.block_until_ready(grad(*args))
    return max(1, round(target_s / (time.perf_counter() - t0)))


def _rel_err(g, ref):
    return float(max(jnp.max(jnp.abs(a - r)) / jnp.max(jnp.abs(r)) for a, r in zip(g, ref)))


def run(quick: bool = False) -> dict:
    # the baselines' plain products must reach the tolerances too: on GPUs float32
    # products default to TF32, with which a fixed-point iteration stalls above 1e-5
    # (the library's CTRNN uses full-precision products itself); no effect on CPUs
    jax.config.update("jax_default_matmul_precision", "highest")
    n, batch = (64, 16) if quick else (256, 64)
    horizons = (50, 200, 1000)
    repeats = 3 if quick else 30
    args = _problem(n, batch, jax.random.key(0))
    fp = optx.FixedPointIteration(rtol=TOL, atol=TOL)
    methods = {f"unrolled T={t}": _unrolled_cost(t) for t in horizons}
    methods.update(
        {
            "CTRNN() defaults": _ctrnn_cost(),
            "implicit (fixed point)": _ctrnn_cost(
                adj.FixedPointSolve(fp), adj.FixedPointAdjoint(fp)
            ),
            "implicit (diffrax Pineda)": _ctrnn_cost(
                adj.Relaxation(rtol=TOL, atol=TOL), adj.PinedaAdjoint(rtol=TOL, atol=TOL)
            ),
            "implicit (lineax LU)": _ctrnn_cost(adj.FixedPointSolve(fp), adj.LinearSolveAdjoint()),
            "optimistix whole batch (GMRES)": _optx_cost(lx.GMRES(rtol=TOL, atol=TOL)),
            "optimistix vmapped": _optx_cost(vmapped=True),
            "diffrax ImplicitAdjoint vmapped": _diffrax_cost,
        }
    )
    grads = {name: jax.jit(jax.grad(cost)) for name, cost in methods.items()}
    memory = {name: compiled_memory(g, *args) for name, g in grads.items()}
    memory["optimistix whole batch (default solver)"] = compiled_memory(
        jax.jit(jax.grad(_optx_cost())), *args
    )
    # memory of the implicit paths against the step budget T (max_steps of both solves)
    implicit_memory_by_T = {}
    for t in horizons:
        lean_t = _ctrnn_cost(
            adj.FixedPointSolve(fp, max_steps=t), adj.FixedPointAdjoint(fp, max_steps=t)
        )
        pineda_t = _ctrnn_cost(
            adj.Relaxation(rtol=TOL, atol=TOL, max_steps=t),
            adj.PinedaAdjoint(rtol=TOL, atol=TOL, max_steps=t),
        )
        implicit_memory_by_T[str(t)] = {
            "fixed point": compiled_memory(jax.jit(jax.grad(lean_t)), *args)["temp_bytes"] / 2**20,
            "diffrax Pineda": compiled_memory(jax.jit(jax.grad(pineda_t)), *args)["temp_bytes"]
            / 2**20,
        }
    # Each timed call runs a method `calls[name]` times back to back (≥ ~0.2 s), so that
    # a 3 ms gradient is not timed within one scheduler slice of a busy machine; times
    # and ratios below are per gradient.
    calls = {name: _calls_per_timing(g, args, quick) for name, g in grads.items()}
    pairs = {
        **{name: (name, "unrolled T=200") for name in grads},
        "optimistix vmapped / CTRNN() defaults": ("optimistix vmapped", "CTRNN() defaults"),
    }
    fns = {
        name: (lambda g=g, k=calls[name]: [g(*args) for _ in range(k)]) for name, g in grads.items()
    }
    for f in fns.values():  # warm-up
        jax.block_until_ready(f())
    # one interleaved round per call, the order rotated from round to round, so that no
    # method always runs just after the long unrolled T = 1000 (on a busy machine the
    # position in the round biased the short times by up to 5×)
    names = list(fns)
    per_round = []
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        per_round.append(
            interleaved_ratios({name: fns[name] for name in order}, 1, {}, warmup=0)["median_s"]
        )
    times = {name: statistics.median(t[name] for t in per_round) / calls[name] for name in names}
    ratios = {
        label: statistics.median(t[a] / calls[a] / (t[b] / calls[b]) for t in per_round)
        for label, (a, b) in pairs.items()
    }
    reference = grads["unrolled T=1000"](*args)
    errors = {name: _rel_err(g(*args), reference) for name, g in grads.items()}

    # forward/adjoint step counts of the defaults (the certificate)
    w, b = args[0]
    lean = adj.CTRNN(weight=w, bias=b)
    sol = lean.solve(args[1])
    x = sol.fixed_point
    asol = lean.solve_adjoint(x, args[1], -2 * (args[2] - x))
    certificate = {
        "forward_steps": int(sol.num_steps),
        "forward_residual": float(sol.residual),
        "adjoint_steps": int(asol.num_steps),
        "adjoint_residual": float(asol.residual),
        "spectral_radius_WF'": float(sol.spectral_radius),
    }

    t200 = times["unrolled T=200"]
    rows = []
    for name in list(methods) + ["optimistix whole batch (default solver)"]:
        mem = memory.get(name, {})
        t = times.get(name)
        rows.append(
            {
                "method": name,
                "median_s": t,
                "ratio_to_unrolled_T200": None if t is None else t / t200,
                "round_ratio_to_unrolled_T200": ratios.get(name),
                "temp_MB": mem.get("temp_bytes", float("nan")) / 2**20,
                "rel_err_vs_unrolled_T1000": errors.get(name),
            }
        )
    lean_t = times["implicit (fixed point)"]
    defaults_ratio = ratios["CTRNN() defaults"]
    defaults_speedup = ratios["optimistix vmapped / CTRNN() defaults"]
    lean_mem = memory["implicit (fixed point)"]["temp_bytes"] / 2**20
    unrolled_mem = [memory[f"unrolled T={t}"]["temp_bytes"] / 2**20 for t in horizons]
    targets = {
        "memory_under_5MB": lean_mem < 5,
        "memory_flat_in_T": max(m["fixed point"] for m in implicit_memory_by_T.values())
        <= 1.01 * min(m["fixed point"] for m in implicit_memory_by_T.values()),
        "time_le_0.15x_unrolled_T200": lean_t / t200 <= 0.15,
        "ratio_to_unrolled_T200": lean_t / t200,
        "speedup_vs_optimistix_vmapped": times["optimistix vmapped"] / lean_t,
        "ge_5x_faster_than_optimistix_vmapped": times["optimistix vmapped"] / lean_t >= 5,
        # issue 13, CTRNN() at its defaults; medians of the per-round ratios
        "defaults_round_ratio_to_unrolled_T200": defaults_ratio,
        "defaults_le_0.05x_unrolled_T200": defaults_ratio <= 0.05,
        "defaults_round_speedup_vs_optimistix_vmapped": defaults_speedup,
        "defaults_ge_10x_faster_than_optimistix_vmapped": defaults_speedup >= 10,
    }
    data = {
        "meta": metadata(),
        "quick": quick,
        "sizes": {"n": n, "batch": batch, "dtype": "float32", "spectral_norm": 0.5, "tol": TOL},
        "repeats": repeats,
        "calls_per_round": calls,
        "rows": rows,
        "unrolled_temp_MB": dict(zip(map(str, horizons), unrolled_mem)),
        "implicit_temp_MB_by_max_steps": implicit_memory_by_T,
        "certificate": certificate,
        "targets": targets,
    }
    meta = data["meta"]
    md = [
        f"# CTRNN: implicit (Pineda–Almeida) gradient{' (quick)' if quick else ''}",
        "",
        f"{meta['date']} · {meta['device']} ({meta['cpu_count']} cores) · jax {meta['jax']} · "
        f"n = {n}, batch = {batch}, float32, ‖W‖₂ = 0.5, tolerances {TOL:.3g} "
        f"(`CTRNN.default_tol(float32)`) · {repeats} interleaved rounds of jit(grad(C)), "
        "in an order rotated from round to round, each method called back to back for "
        "≥ 0.2 s per round (not in --quick); "
        "× unrolled: the median over the rounds of the ratio of the two per-call times.",
        "",
        md_table(
            ["method", "median (ms)", "× unrolled T=200", "XLA temp (MB)", "rel. err vs T=1000"],
            [
                [
                    r["method"],
                    "not run" if r["median_s"] is None else r["median_s"] * 1e3,
                    "—"
                    if r["round_ratio_to_unrolled_T200"] is None
                    else r["round_ratio_to_unrolled_T200"],
                    r["temp_MB"],
                    "—"
                    if r["rel_err_vs_unrolled_T1000"] is None
                    else r["rel_err_vs_unrolled_T1000"],
                ]
                for r in rows
            ],
        ),
        "",
        "XLA temp (MB) against the step budget T (max_steps of both solves): "
        + "; ".join(
            f"T = {t}: unrolled {u:.3g}, implicit fixed point {m['fixed point']:.3g}, "
            f"implicit diffrax Pineda {m['diffrax Pineda']:.3g}"
            for (t, m), u in zip(implicit_memory_by_T.items(), unrolled_mem)
        ),
        "",
        "Certificate of `CTRNN()` at its defaults: "
        + ", ".join(f"{k} = {v:.3g}" for k, v in certificate.items()),
        "",
        "Targets: "
        + ", ".join(
            f"{k} = {v:.3g}" if isinstance(v, float) else f"{k}: {'met' if v else 'MISSED'}"
            for k, v in targets.items()
        ),
    ]
    name = "ctrnn_quick" if quick else "ctrnn"
    write_results(name, data, "\n".join(md))
    _plot(name, data)
    print("\n".join(md))
    return data


def _plot(name: str, data: dict) -> None:
    """Gradient time and memory against the number of relaxation steps T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unrolled = {
        int(r["method"].split("T=")[1]): r
        for r in data["rows"]
        if r["method"].startswith("unrolled")
    }
    ts = sorted(unrolled)
    implicit = {r["method"]: r for r in data["rows"] if r["method"].startswith("implicit")}
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    ax[0].loglog(
        ts, [1e3 * unrolled[t]["median_s"] for t in ts], marker="o", label="unrolled (BPTT)"
    )
    for i, (method, r) in enumerate(implicit.items()):
        if r["median_s"] is not None:
            ax[0].axhline(1e3 * r["median_s"], ls="--", lw=1, color=f"C{i + 1}", label=method)
    ax[1].loglog(ts, [data["unrolled_temp_MB"][str(t)] for t in ts], marker="o", label="unrolled")
    for method in next(iter(data["implicit_temp_MB_by_max_steps"].values())):
        ax[1].loglog(
            ts,
            [data["implicit_temp_MB_by_max_steps"][str(t)][method] for t in ts],
            marker="s",
            label=f"implicit ({method}), max steps = T",
        )
    ax[0].set(xlabel="relaxation steps T", ylabel="median ms", title="gradient time")
    ax[1].set(xlabel="relaxation steps T", ylabel="XLA temp MB", title="memory")
    for a in ax:
        a.legend(fontsize=7)
    save_figure(name, fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a minute on a CPU")
    args = parser.parse_args(argv)
    run(quick=args.quick)


if __name__ == "__main__":
    main()
