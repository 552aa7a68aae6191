"""Implicit derivatives of `control.solve` against differentiating through the iterations.

Problem family (`chain`): a chain of n/2 damped pendulums, each coupled to its
neighbours (and the two walls) by torsional springs with a cubic hardening term, each
with its own torque (m = n/2 controls, no bounds), symplectic Euler over a fixed
duration of 4 s with Δt = 4/N:

    ω_i ← ω_i + Δt (−a sin θ_i − c ω_i + s_i − s_{i−1} + u_i),  θ_i ← θ_i + Δt ω_i,
    s_i = k d_i + κ d_i³,  d_i = θ_{i+1} − θ_i  (θ_0 = θ_{n/2+1} = 0: the walls),
    ℓ = Δt (q ‖θ‖² + 0.1 q ‖ω‖² + r ‖u‖²),  φ = 10 ‖X‖²,

from θ(0) = linspace(2, −1, n/2), ω(0) = 0. The parameters θ = (a, c, k, κ, q, r) (p = 6:
dynamics and the cost's weights) are closed over as one JAX array, float64.

1. **Implicit VJP vs the solve.** loss(θ) = Σ u*(θ)² with u* = `solve(chain(θ), 0,
   ILQR())`.controls; `jit(loss)` and `jit(value_and_grad(loss))` timed interleaved; the
   VJP's share is the median over rounds of t(value_and_grad) / t(solve) − 1 (goal ≤ 0.3).
2. **Against reverse mode through an unrolled iLQR.** The baseline a user would write
   (`unrolled_ilqr`): K = 50 Gauss–Newton iLQR iterations as a `lax.scan` (linearise with
   `jacfwd` / `grad` / `hessian`, a Riccati `lax.scan` backward with μ = 10⁻⁸, a full-step
   (α = 1) closed-loop rollout forward), from the same u = 0, differentiated by
   `jax.value_and_grad`. Compared: the gradients (relative 2-norm difference), the times
   (median of per-round ratios) and XLA's temporary memory of both jitted
   `value_and_grad` (`compiled_memory`; goal ≥ 10× less for ours).
3. **Against forward mode through the solver's loop.** The Jacobian (m+1) × p of
   y(θ) = (u*(0), C*) (the MPC feedback and the optimal value) by `jax.jacfwd` through
   `ILQR().run` (its `while_loop`s carry p tangents through every iteration), versus
   `jax.jacfwd` and `jax.jacrev` of `solve` (p JVPs, resp. m+1 VJPs, of one LQ solve each).

Every function is jitted whole; each is compiled once (its compile time is recorded),
warmed up, then the functions compared are run interleaved A B A B … with
`block_until_ready`; reported are the medians of the absolute times and the median of
the per-round ratios.

    python -m benchmarks.implicit [--quick]
"""

import argparse
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import _common
from ._common import (
    compile_seconds,
    compiled_memory,
    interleaved_ratios,
    md_table,
    metadata,
    save_figure,
    write_results,
)


THETA0 = (4.0, 0.2, 1.0, 0.5, 1.0, 0.05)  # a, c, k, κ, q, r
PARAMS = ("a (gravity)", "c (damping)", "k (spring)", "κ (cubic spring)", "q", "r")
DURATION = 4.0
UNROLLED_ITERATIONS = 50
UNROLLED_MU = 1e-8
TOL = 1e-8  # ILQR's default tolerance in float64


def chain(theta, n: int, horizon: int):
    """The chain of n/2 coupled pendulums of the module docstring, parameters `theta`."""
    from adjoint import control

    nq = n // 2
    dt = DURATION / horizon
    a, c, k, kappa, q, r = (theta[i] for i in range(6))

    def dynamics(x, u, t):
        th, om = x[:nq], x[nq:]
        d = jnp.diff(th, prepend=0.0, append=0.0)
        s = k * d + kappa * d**3
        om = om + dt * (-a * jnp.sin(th) - c * om + s[1:] - s[:-1] + u)
        return jnp.concatenate([th + dt * om, om])

    def running_cost(x, u, t):
        return dt * (q * jnp.sum(x[:nq] ** 2) + 0.1 * q * jnp.sum(x[nq:] ** 2) + r * jnp.sum(u**2))

    def terminal_cost(x):
        return 10.0 * jnp.sum(x**2)

    x0 = jnp.concatenate([jnp.linspace(2.0, -1.0, nq), jnp.zeros(nq)]).astype(theta.dtype)
    return control.ControlProblem(
        dynamics, running_cost, terminal_cost, x0, horizon, control_size=nq
    )


def _rollout_cost(problem, u):
    """C(u) by a plain `lax.scan` (no custom VJP: forward mode goes through it)."""
    ks = jnp.arange(problem.horizon, dtype=jnp.int32)

    def step(x, inp):
        uk, k = inp
        return problem.f(x, uk, k), problem.ell(x, uk, k)

    xN, ls = jax.lax.scan(step, problem.x0[0], (u, ks))
    return jnp.sum(ls) + problem.phi(xN)


def unrolled_ilqr(problem, u0, iterations: int = UNROLLED_ITERATIONS, mu: float = UNROLLED_MU):
    """Plain Gauss–Newton iLQR, `iterations` full steps (α = 1) from `u0`, as a `lax.scan`:
    differentiable by `jax.grad` (which stores every iteration's linearisation)."""
    f, ell, phi = problem.f, problem.ell, problem.phi
    x0 = problem.x0[0]
    ks = jnp.arange(problem.horizon, dtype=jnp.int32)
    eye = jnp.eye(u0.shape[1], dtype=u0.dtype)

    def linearise(x, uk, k):
        fx, fu = jax.jacfwd(f, argnums=(0, 1))(x, uk, k)
        lx, lu = jax.grad(ell, argnums=(0, 1))(x, uk, k)
        (lxx, _), (lux, luu) = jax.hessian(ell, argnums=(0, 1))(x, uk, k)
        return fx, fu, lx, lu, lxx, luu, lux

    def backward(carry, lin):
        Vx, Vxx = carry
        fx, fu, lx, lu, lxx, luu, lux = lin
        Qx, Qu = lx + fx.T @ Vx, lu + fu.T @ Vx
        Qxx = lxx + fx.T @ Vxx @ fx
        Quu = luu + fu.T @ Vxx @ fu + mu * eye
        Qux = lux + fu.T @ Vxx @ fx
        cho = jax.scipy.linalg.cho_factor(Quu)
        kff = -jax.scipy.linalg.cho_solve(cho, Qu)
        K = -jax.scipy.linalg.cho_solve(cho, Qux)
        Vx = Qx + K.T @ Quu @ kff + K.T @ Qu + Qux.T @ kff
        Vxx = Qxx + K.T @ Quu @ K + K.T @ Qux + Qux.T @ K
        return (Vx, 0.5 * (Vxx + Vxx.T)), (kff, K)

    def iteration(u, _):
        def roll(x, inp):
            uk, k = inp
            return f(x, uk, k), x

        xN, xs = jax.lax.scan(roll, x0, (u, ks))
        lin = jax.vmap(linearise)(xs, u, ks)
        VN = (jax.grad(phi)(xN), jax.hessian(phi)(xN))
        _, (kff, K) = jax.lax.scan(backward, VN, lin, reverse=True)

        def forward(xh, inp):
            x, uk, kk, Kk, k = inp
            un = uk + kk + Kk @ (xh - x)
            return f(xh, un, k), un

        _, un = jax.lax.scan(forward, x0, (xs, u, kff, K, ks))
        return un, None

    u, _ = jax.lax.scan(iteration, u0, None, length=iterations)
    return u


def _functions(n: int, N: int):
    from adjoint import control

    u0 = jnp.zeros((N, n // 2), jnp.float64)

    def loss(theta):
        s = control.solve(chain(theta, n, N), u0, control.ILQR())
        return jnp.sum(s.controls**2), (s.controls, s.num_steps, s.derivative_ok)

    def loss_unrolled(theta):
        u = unrolled_ilqr(chain(theta, n, N), u0)
        return jnp.sum(u**2), u

    def y_ours(theta):
        s = control.solve(chain(theta, n, N), u0, control.ILQR())
        return jnp.concatenate([s.controls[0], s.cost[None]])

    def y_run(theta):
        problem = chain(theta, n, N)
        u = control.ILQR().run(problem, u0, TOL)[0]
        return jnp.concatenate([u[0], _rollout_cost(problem, u)[None]])

    return {
        "solve": jax.jit(loss),
        "value_and_grad": jax.jit(jax.value_and_grad(loss, has_aux=True)),
        "unrolled_value_and_grad": jax.jit(jax.value_and_grad(loss_unrolled, has_aux=True)),
        "jacfwd_run": jax.jit(jax.jacfwd(y_run)),
        "jacfwd_ours": jax.jit(jax.jacfwd(y_ours)),
        "jacrev_ours": jax.jit(jax.jacrev(y_ours)),
    }


def _analyse(n: int, N: int):
    from adjoint import control

    return jax.jit(lambda theta, u: control.analyse(chain(theta, n, N), u, TOL))


def _repeats(fns, theta, budget: float, lo: int, hi: int) -> int:
    """Rounds that fit `budget` seconds, from one timed call of each (warm)."""
    t0 = time.perf_counter()
    for f in fns:
        jax.block_until_ready(f(theta))
    per_round = time.perf_counter() - t0
    return int(min(hi, max(lo, math.ceil(budget / max(per_round, 1e-9)))))


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _bench(n: int, N: int, quick: bool, jacobians: bool = True) -> dict:
    theta = jnp.asarray(THETA0, jnp.float64)
    fns = _functions(n, N)
    if not jacobians:  # quick mode: section 3 at the smallest size only (compile time)
        fns = {k: v for k, v in fns.items() if not k.startswith("jac")}
    compile_s, memory = {}, {}
    for name, f in fns.items():
        compile_s[name] = compile_seconds(f, theta)
        memory[name] = compiled_memory(f, theta)  # cached: no second compile
    budget, lo, hi = (1.0, 3, 10) if quick else (4.0, 5, 30)

    # values (and warm-up)
    (v, (u, iterations, ok)), g = fns["value_and_grad"](theta)
    (v_unr, u_unr), g_unr = fns["unrolled_value_and_grad"](theta)
    # what of our memory is the solution's check (`control.analyse`: KKT residuals and the
    # Pontryagin test on a grid of candidate controls at every stage), which `solve` runs
    memory["analyse"] = compiled_memory(_analyse(n, N), theta, u)

    call = lambda name: lambda: fns[name](theta)
    # 1. the implicit VJP against the solve
    names = ("solve", "value_and_grad")
    r1 = interleaved_ratios(
        {k: call(k) for k in names},
        _repeats([fns[k] for k in names], theta, budget, lo, hi),
        {"value_and_grad/solve": ("value_and_grad", "solve")},
    )
    # 2. against reverse mode through the unrolled iterations
    names = ("value_and_grad", "unrolled_value_and_grad")
    r2 = interleaved_ratios(
        {k: call(k) for k in names},
        _repeats([fns[k] for k in names], theta, budget, lo, hi),
        {"unrolled/ours": ("unrolled_value_and_grad", "value_and_grad")},
        warmup=0,
    )
    temp = {k: m.get("temp_bytes", float("nan")) for k, m in memory.items()}
    row = {
        "n": n,
        "m": n // 2,
        "N": N,
        "p": len(THETA0),
        "ilqr_iterations": int(iterations),
        "derivative_ok": bool(ok),
        "loss": float(v),
        # 1.
        "solve_s": r1["median_s"]["solve"],
        "value_and_grad_s": r1["median_s"]["value_and_grad"],
        "value_and_grad_over_solve": r1["ratio"]["value_and_grad/solve"],
        "vjp_fraction": r1["ratio"]["value_and_grad/solve"] - 1,
        "repeats_1": r1["repeats"],
        # 2.
        "ours_value_and_grad_s": r2["median_s"]["value_and_grad"],
        "unrolled_value_and_grad_s": r2["median_s"]["unrolled_value_and_grad"],
        "unrolled_over_ours_time": r2["ratio"]["unrolled/ours"],
        "repeats_2": r2["repeats"],
        "unrolled_iterations": UNROLLED_ITERATIONS,
        "grad_rel_diff": _rel(g_unr, g),
        "controls_max_abs_diff": float(np.max(np.abs(np.asarray(u_unr) - np.asarray(u)))),
        "loss_unrolled": float(v_unr),
        "temp_bytes": temp,
        "unrolled_over_ours_memory": temp["unrolled_value_and_grad"] / temp["value_and_grad"],
        "compile_s": compile_s,
        "memory": memory,
    }
    if not jacobians:
        row["load_average_1min"] = os.getloadavg()[0]
        return row
    # 3. against forward mode through the solver's loop
    J_run, J_fwd, J_rev = (fns[k](theta) for k in ("jacfwd_run", "jacfwd_ours", "jacrev_ours"))
    names = ("jacfwd_run", "jacfwd_ours", "jacrev_ours")
    r3 = interleaved_ratios(
        {k: call(k) for k in names},
        _repeats([fns[k] for k in names], theta, budget, lo, hi),
        {
            "jacfwd_run/jacfwd_ours": ("jacfwd_run", "jacfwd_ours"),
            "jacfwd_run/jacrev_ours": ("jacfwd_run", "jacrev_ours"),
        },
    )
    row |= {
        "jacfwd_run_s": r3["median_s"]["jacfwd_run"],
        "jacfwd_ours_s": r3["median_s"]["jacfwd_ours"],
        "jacrev_ours_s": r3["median_s"]["jacrev_ours"],
        "jacfwd_run_over_jacfwd_ours": r3["ratio"]["jacfwd_run/jacfwd_ours"],
        "jacfwd_run_over_jacrev_ours": r3["ratio"]["jacfwd_run/jacrev_ours"],
        "repeats_3": r3["repeats"],
        "jacobian_rel_diff_run": _rel(J_run, J_fwd),
        "jacobian_rel_diff_rev": _rel(J_rev, J_fwd),
    }
    row["load_average_1min"] = os.getloadavg()[0]
    return row


def _figure(rows: list[dict], name: str, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for n in sorted({r["n"] for r in rows}):
        rs = sorted((r for r in rows if r["n"] == n), key=lambda r: r["N"])
        Ns = [r["N"] for r in rs]
        ax[0].plot(Ns, [r["value_and_grad_over_solve"] for r in rs], "o-", label=f"n = {n}")
        ax[1].plot(Ns, [r["unrolled_over_ours_time"] for r in rs], "o-", label=f"time, n = {n}")
        ax[1].plot(
            Ns, [r["unrolled_over_ours_memory"] for r in rs], "s--", label=f"XLA temp, n = {n}"
        )
        rj = [r for r in rs if "jacfwd_run_s" in r]
        Nj = [r["N"] for r in rj]
        ax[2].plot(
            Nj, [r["jacfwd_run_over_jacfwd_ours"] for r in rj], "o-", label=f"jacfwd, n = {n}"
        )
        ax[2].plot(
            Nj, [r["jacfwd_run_over_jacrev_ours"] for r in rj], "s--", label=f"jacrev, n = {n}"
        )
    ax[0].axhline(1.3, color="grey", ls=":", label="goal ≤ 1.3")
    ax[0].set_title("value_and_grad / solve (ours)")
    ax[1].axhline(10, color="grey", ls=":", label="memory goal ≥ 10")
    ax[1].set_title(f"unrolled iLQR (K = {UNROLLED_ITERATIONS}) grad / ours")
    ax[2].set_title("jacfwd through ILQR.run / ours")
    fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    Ns = sorted({r["N"] for r in rows})
    for a in ax:
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xticks(Ns, [str(N) for N in Ns])
        a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        a.yaxis.set_major_formatter(fmt)
        a.yaxis.set_minor_formatter(fmt)
        a.tick_params(axis="y", which="minor", labelsize=7)
        a.set_xlabel("horizon N")
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=7)
    ax[0].set_ylabel("ratio (median of per-round ratios)")
    fig.suptitle(subtitle, fontsize=9)
    save_figure(name, fig)


def run(quick: bool = False, sizes=None) -> dict:
    """`sizes`: (n, N) pairs (default: quick n = 4, N = 50, 100; full n = 4, 12 and
    N = 50 … 1000)."""
    if sizes is None:
        Ns = (50, 100) if quick else (50, 100, 200, 500, 1000)
        sizes = [(n, N) for n in ((4,) if quick else (4, 12)) for N in Ns]
    load_start = os.getloadavg()[0]
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        # quick: the Jacobians (section 3) at the first size only, to save compile time
        rows = [
            _bench(n, N, quick, jacobians=not quick or i == 0) for i, (n, N) in enumerate(sizes)
        ]
    finally:
        jax.config.update("jax_enable_x64", previous)
    meta = metadata()
    meta["load_average_1min_at_start"] = load_start
    meta["load_average_1min_at_end"] = os.getloadavg()[0]
    name = "implicit_quick" if quick else "implicit"
    data = {
        "meta": meta,
        "quick": quick,
        "dtype": "float64",
        "problem": {
            "family": "chain of n/2 coupled damped pendulums with cubic springs, m = n/2",
            "duration_s": DURATION,
            "theta0": dict(zip(PARAMS, THETA0)),
            "u_init": 0.0,
            "method": "control.ILQR() (defaults: Gauss–Newton, tol 1e-8)",
        },
        "unrolled": {"iterations": UNROLLED_ITERATIONS, "mu": UNROLLED_MU, "step": 1.0},
        "results": rows,
    }

    mb = lambda b: b / 2**20
    table1 = md_table(
        [
            "n",
            "m",
            "N",
            "iLQR its",
            "solve (ms)",
            "value_and_grad (ms)",
            "VJP / solve",
            f"unrolled K={UNROLLED_ITERATIONS} grad (ms)",
            "time: unrolled / ours",
            "XLA temp ours (MiB)",
            "XLA temp unrolled (MiB)",
            "memory: unrolled / ours",
            "of ours: the check (MiB)",
            "grad rel. diff",
        ],
        [
            [
                r["n"],
                r["m"],
                r["N"],
                r["ilqr_iterations"],
                1e3 * r["solve_s"],
                1e3 * r["value_and_grad_s"],
                f"{r['vjp_fraction']:+.2f}",
                1e3 * r["unrolled_value_and_grad_s"],
                f"{r['unrolled_over_ours_time']:.3g}×",
                mb(r["temp_bytes"]["value_and_grad"]),
                mb(r["temp_bytes"]["unrolled_value_and_grad"]),
                f"{r['unrolled_over_ours_memory']:.3g}×",
                mb(r["temp_bytes"]["analyse"]),
                f"{r['grad_rel_diff']:.1e}",
            ]
            for r in rows
        ],
    )
    table2 = md_table(
        [
            "n",
            "m",
            "N",
            "jacfwd through ILQR.run (ms)",
            "jacfwd ours (ms)",
            "jacrev ours (ms)",
            "speed-up jacfwd",
            "speed-up jacrev",
            "XLA temp run / jacfwd / jacrev (MiB)",
            "Jacobian rel. diff (run; jacrev)",
        ],
        [
            [
                r["n"],
                r["m"],
                r["N"],
                1e3 * r["jacfwd_run_s"],
                1e3 * r["jacfwd_ours_s"],
                1e3 * r["jacrev_ours_s"],
                f"{r['jacfwd_run_over_jacfwd_ours']:.3g}×",
                f"{r['jacfwd_run_over_jacrev_ours']:.3g}×",
                " / ".join(
                    f"{mb(r['temp_bytes'][k]):.3g}"
                    for k in ("jacfwd_run", "jacfwd_ours", "jacrev_ours")
                ),
                f"{r['jacobian_rel_diff_run']:.1e}; {r['jacobian_rel_diff_rev']:.1e}",
            ]
            for r in rows
            if "jacfwd_run_s" in r
        ],
    )
    compile_line = "; ".join(
        f"n={r['n']} N={r['N']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["compile_s"].items())
        for r in rows
    )
    header = (
        f"{meta['date']}; {meta['device']} ({meta['cpu_count']} cores); python "
        f"{meta['python']}; jax {meta['jax']}; jaxlib {meta['jaxlib']}; equinox "
        f"{meta['equinox']}; float64; 1-min load average {load_start:.1f} at start, "
        f"{meta['load_average_1min_at_end']:.1f} at end"
    )
    md = "\n".join(
        [
            "# Implicit derivatives of control.solve" + (" (quick)" if quick else ""),
            "",
            header,
            "",
            "Problem: a chain of n/2 coupled damped pendulums with cubic springs (state size "
            "n, m = n/2 torques, no bounds), 4 s in N symplectic-Euler steps, u_init = 0; "
            f"p = {len(THETA0)} parameters θ = (gravity, damping, spring, cubic spring, state "
            "weight q, control weight r) closed over as one array; method `control.ILQR()` "
            "(defaults). Times: medians over rounds run interleaved after warm-up; ratios: "
            "medians of the per-round ratios; XLA temp = `compiled_memory(...)['temp_bytes']` "
            "of the jitted function.",
            "",
            "## 1–2. Gradient of Σ u*² : implicit VJP vs reverse mode through unrolled iLQR",
            "",
            "VJP / solve = t(jit(value_and_grad(loss))) / t(jit(loss)) − 1 (goal ≤ 0.3). "
            f"Unrolled: K = {UNROLLED_ITERATIONS} full-step Gauss–Newton iLQR iterations "
            f"(μ = {UNROLLED_MU:g}) as a `lax.scan`, `jax.value_and_grad` through it (goal: "
            "≥ 10× the memory of ours). grad rel. diff = ‖g_unrolled − g_ours‖ / ‖g_ours‖. "
            "'The check' is the XLA temp of `control.analyse` alone (KKT residuals and the "
            "Pontryagin test on a grid of ~10³ candidate controls per stage), which `solve` "
            "runs on every call (XLA may fuse it differently inside the whole function).",
            "",
            table1,
            "",
            "## 3. Jacobian of y = (u*(0), C*) w.r.t. θ: forward mode through the loop vs ours",
            "",
            "`jax.jacfwd` through `ILQR().run` (p tangents carried through every iteration's "
            "`while_loop`s) against `jax.jacfwd` (p JVPs) and `jax.jacrev` (m+1 VJPs) of "
            "`solve`. Speed-up = median of per-round t(jacfwd run) / t(ours)."
            + (" Quick mode: at the first size only." if quick else ""),
            "",
            table2,
            "",
            f"Compile times (s, trace + XLA): {compile_line}.",
            "",
            "1-min load average after each size: "
            + ", ".join(f"n={r['n']} N={r['N']}: {r['load_average_1min']:.1f}" for r in rows)
            + f" (on {meta['cpu_count']} cores; above ~1 means other jobs shared the CPU: "
            "absolute times are then slower, the per-round ratios less affected).",
        ]
    )
    write_results(name, data, md)
    _figure(rows, name, header)
    return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="results directory")
    args = parser.parse_args()
    if args.out is not None:
        from pathlib import Path

        _common.RESULTS = Path(args.out).resolve()
    run(quick=args.quick)
    print((_common.RESULTS / ("implicit_quick.md" if args.quick else "implicit.md")).read_text())
