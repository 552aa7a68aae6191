"""General constraints: `control.solve` (augmented Lagrangian around iLQR + Newton polish)
against CasADi + IPOPT and SciPy's SLSQP on the same discretised problems.

Problems (`adjoint.problems`, float64):

- `cartpole_track(N)`: cart-pole swing-up in N Δt = 2.5 s, terminal equality X(N) =
  (0, π, 0, 0), track |p| ≤ 0.5 (two stage inequalities), |u| ≤ 20, C = Σ 0.01 Δt u²;
  N = 25, 50, 100, 200.
- `car_obstacle(N)`: kinematic car from rest at the origin to rest at (3, 0) in
  N Δt = 5 s around the disc |p − (1.5, 0.1)| ≥ 0.6, |κ|, |a| ≤ 2, C = Σ ½ Δt |u|²;
  N = 25, 50, 100.

Starts: u = 0 and uniform random controls in ±0.1 × the box (seeds 0, 1, …).

Solvers, each from the same controls:

- **ours**: `control.solve(problem, u, throw=False)` (default `AugmentedLagrangian()`),
  inside one `jax.jit` of u; compiled and warmed up first, so the times exclude the
  compilation (reported separately).
- **ipopt-ms**: CasADi + IPOPT, multiple shooting (X(0..N) and u as variables, the
  dynamics as equality constraints), exact Hessians (SX), `ipopt.tol = 1e-8`, MUMPS;
  started from the controls and their rollout.
- **ipopt-ss**: CasADi + IPOPT, single shooting (the controls only).
- **slsqp**: `scipy.optimize.minimize(method="SLSQP")` on the controls (single
  shooting), cost, constraints and their Jacobians from JAX (`jit` of `value_and_grad`
  and `jacfwd`), `ftol = 1e-10`, `maxiter = 500`, stopped (unsolved) after
  `SLSQP_TIME_LIMIT` s of wall clock: its dense QP costs ~0.5 s per iteration at N = 200.
- **trajax**: `trajax.optimizers.constrained_ilqr` (box as inequalities), only where
  `trajax` is importable (it is not on PyPI); else the column is left out.

The CasADi models are written from the problems' docstrings (`_Model`, once over a
math namespace: NumPy or CasADi) and checked against `adjoint.problems` on a random
trajectory to 1e-12 before anything is timed. Every solver's answer is judged by one
independent function (`check`: a NumPy rollout of the returned controls, the cost, the
constraints and the box); a run is *solved* when its violation is ≤ 1e-6 and the
solver reports success. Per start the solvers run interleaved (ours, ipopt-ms, ipopt-ss,
slsqp[, trajax]), then the next start, for `rounds` rounds; a run that failed in the
first round, or took over `REPEAT_BELOW` s, is not repeated (its ratio to ours is far from
1 either way). The ratio "ours ÷ solver" is the median over (start, round) of the same
round's time ratio, on the starts both solved.

    python -m benchmarks.constraints [--quick]

On a machine shared with other jobs, JAX's CPU threads (dispatch, XLA's thread pools)
make our times erratic: the same solve 0.05 s or 2.5 s at random, from threads waiting
for a core. IPOPT and SLSQP compute on one thread; the committed results pin the whole
process to one core and one XLA thread (both recorded in the metadata):

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
        taskset -c 1 python -m benchmarks --only constraints --update-results
"""

import argparse
import importlib.util
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import _common
from ._common import md_table, metadata, write_results


FEASIBLE = 1e-6  # violation that counts as a solution
START_SCALE = 0.1  # random starts: uniform in ±START_SCALE × the box
CARTPOLE = {"duration": 2.5, "track": 0.5, "u_max": 20.0}
CAR = {
    "duration": 5.0,
    "goal": (3.0, 0.0),
    "obstacle": (1.5, 0.1),
    "radius": 0.6,
    "u_max": (2.0, 2.0),
}
MC, MP, POLE, GRAVITY = 1.0, 0.3, 0.5, 9.81  # `problems.cartpole`'s constants
IPOPT_OPTIONS = {
    "ipopt.tol": 1e-8,
    "ipopt.print_level": 0,
    "ipopt.sb": "yes",
    "ipopt.max_wall_time": 30.0,
    "print_time": False,
}
SLSQP_OPTIONS = {"ftol": 1e-10, "maxiter": 500}
SLSQP_TIME_LIMIT = 12.0  # s of wall clock per run (SLSQP's dense QP: ~0.5 s/iteration at N = 200)
REPEAT_BELOW = 5.0  # s: only solved runs faster than this are timed again in later rounds
TRAJAX_OPTIONS = {
    "maxiter_al": 12,
    "maxiter_ilqr": 100,
    "grad_norm_threshold": 1e-6,
    "constraints_threshold": 1e-7,
}


# --------------------------------------------------------------------------- models
class _Model:
    """One discretised problem written from its docstring over a math namespace `M`
    (NumPy or CasADi: `M.sin`, `M.cos`); states and controls are indexable vectors,
    every function returns a scalar or a list of scalars."""

    def __init__(self, name: str, N: int):
        self.name, self.N = name, N
        if name == "cartpole_track":
            self.n, self.m = 4, 1
            self.dt = CARTPOLE["duration"] / N
            bound = CARTPOLE["u_max"]
            self.lower, self.upper = np.full(1, -bound), np.full(1, bound)
        elif name == "car_obstacle":
            self.n, self.m = 4, 2
            self.dt = CAR["duration"] / N
            bound = np.asarray(CAR["u_max"], float)
            self.lower, self.upper = -bound, bound
        else:
            raise ValueError(name)
        self.x0 = np.zeros(self.n)

    def problem(self):
        """The same problem from `adjoint.problems`."""
        from adjoint import problems

        if self.name == "cartpole_track":
            return problems.cartpole_track(self.N, **CARTPOLE)
        return problems.car_obstacle(self.N, **CAR)

    def f(self, x, u, M):
        dt = self.dt
        if self.name == "cartpole_track":
            p, th, pd, thd = x[0], x[1], x[2], x[3]
            s, c = M.sin(th), M.cos(th)
            den = MC + MP * s**2
            pdd = (u[0] + MP * s * (POLE * thd**2 + GRAVITY * c)) / den
            thdd = (-u[0] * c - MP * POLE * thd**2 * c * s - (MC + MP) * GRAVITY * s) / (POLE * den)
            pd, thd = pd + dt * pdd, thd + dt * thdd
            return [p + dt * pd, th + dt * thd, pd, thd]
        px, py, psi, v = x[0], x[1], x[2], x[3]
        return [
            px + dt * v * M.cos(psi),
            py + dt * v * M.sin(psi),
            psi + dt * v * u[0],
            v + dt * u[1],
        ]

    def ell(self, x, u, M):
        if self.name == "cartpole_track":
            return 0.01 * self.dt * u[0] ** 2
        return 0.5 * self.dt * (u[0] ** 2 + u[1] ** 2)

    def phi(self, x, M):
        return 0.0

    def g(self, x, u, M):  # stage equalities
        return []

    def h(self, x, u, M):  # stage inequalities ≤ 0
        if self.name == "cartpole_track":
            return [x[0] - CARTPOLE["track"], -x[0] - CARTPOLE["track"]]
        (cx, cy), r = CAR["obstacle"], CAR["radius"]
        return [r**2 - ((x[0] - cx) ** 2 + (x[1] - cy) ** 2)]

    def g_T(self, x, M):
        if self.name == "cartpole_track":
            return [x[0], x[1] - np.pi, x[2], x[3]]
        gx, gy = CAR["goal"]
        return [x[0] - gx, x[1] - gy, x[3]]

    def h_T(self, x, M):
        return []


def rollout_np(model: _Model, u) -> np.ndarray:
    X = [model.x0]
    for k in range(model.N):
        X.append(np.asarray(model.f(X[-1], u[k], np), float))
    return np.stack(X)


def check(model: _Model, u) -> dict:
    """The independent judge of every solver: a NumPy rollout of the controls `u`, the
    cost, and the largest violation of the constraints and of the box."""
    u = np.asarray(u, float).reshape(model.N, model.m)
    X = rollout_np(model, u)
    cost = sum(model.ell(X[k], u[k], np) for k in range(model.N)) + model.phi(X[-1], np)
    eq = [abs(v) for k in range(model.N) for v in model.g(X[k], u[k], np)]
    eq += [abs(v) for v in model.g_T(X[-1], np)]
    ineq = [v for k in range(model.N) for v in model.h(X[k], u[k], np)]
    ineq += list(model.h_T(X[-1], np))
    box = np.concatenate([(model.lower - u).ravel(), (u - model.upper).ravel()])
    viol = max(max(eq, default=0.0), max(ineq, default=0.0), float(np.max(box)), 0.0)
    if not (np.all(np.isfinite(X)) and np.isfinite(cost) and np.isfinite(viol)):
        return {"cost": float("nan"), "violation": float("inf")}
    return {"cost": float(cost), "violation": float(viol)}


def starts(model: _Model, count: int) -> dict[str, np.ndarray]:
    """u = 0, then uniform random controls in ±START_SCALE × the box (seeds 0, 1, …)."""
    out = {"zeros": np.zeros((model.N, model.m))}
    for seed in range(count - 1):
        rng = np.random.default_rng(seed)
        out[f"seed {seed}"] = START_SCALE * rng.uniform(-1, 1, (model.N, model.m)) * model.upper
    return out


def verify_models(model: _Model, problem, casadi) -> dict:
    """The NumPy and CasADi models against `adjoint.problems` on random controls in the
    box: states, cost and constraints agree to 1e-12 (relative to 1 + |value|)."""
    from adjoint import control

    rng = np.random.default_rng(1234)
    u = rng.uniform(model.lower, model.upper, (model.N, model.m))
    uj = jnp.asarray(u)
    X_jax = np.asarray(problem.rollout(uj))[:, 0]
    vals = control.constraint_values(problem, uj)
    h_jax = np.concatenate([np.ravel(vals.inequality), np.ravel(vals.terminal_inequality)])
    g_jax = np.concatenate([np.ravel(vals.equality), np.ravel(vals.terminal_equality)])
    cost_jax = float(problem.cost(uj))

    def rel(a, b):
        a, b = np.asarray(a, float), np.asarray(b, float)
        return float(np.max(np.abs(a - b) / (1 + np.abs(b)), initial=0.0))

    X_np = rollout_np(model, u)
    res = check(model, u)
    N = model.N
    h_np = [v for k in range(N) for v in model.h(X_np[k], u[k], np)] + model.h_T(X_np[-1], np)
    g_np = [v for k in range(N) for v in model.g(X_np[k], u[k], np)] + model.g_T(X_np[-1], np)
    errors = {
        "numpy_states": rel(X_np, X_jax),
        "numpy_cost": rel(res["cost"], cost_jax),
        "numpy_constraints": max(rel(h_np, h_jax), rel(g_np, g_jax)),
    }
    if casadi is not None:
        x = casadi.SX.sym("x", model.n)
        uk = casadi.SX.sym("u", model.m)
        f = casadi.Function("f", [x, uk], [casadi.vertcat(*model.f(x, uk, casadi))])
        X_ca = [model.x0]
        for k in range(N):
            X_ca.append(np.asarray(f(X_ca[-1], u[k])).ravel())
        errors["casadi_states"] = rel(np.stack(X_ca), X_jax)
    worst = max(errors.values())
    if not worst <= 1e-12:
        raise AssertionError(f"{model.name} N={N}: models disagree with adjoint.problems: {errors}")
    return errors


# --------------------------------------------------------------------------- solvers
def _ours(model: _Model, problem):
    from adjoint import RESULTS, control

    solve = jax.jit(lambda u: control.solve(problem, u, throw=False))

    def run(u0):
        sol = jax.block_until_ready(solve(jnp.asarray(u0)))
        return (
            np.asarray(sol.controls),
            bool(sol.converged),
            {
                "iterations": int(sol.num_steps),
                "result": RESULTS[sol.result] or "successful",
            },
        )

    t0 = time.perf_counter()
    run(np.zeros((model.N, model.m)))  # compile
    return run, time.perf_counter() - t0


def _casadi_bounds(model: _Model, rows):
    lbg, ubg = [], []
    for kind, count in rows:
        lbg += [0.0 if kind == "eq" else -np.inf] * count
        ubg += [0.0] * count
    return np.asarray(lbg), np.asarray(ubg)


def _ipopt_ms(model: _Model, ca):
    n, m, N = model.n, model.m, model.N
    t0 = time.perf_counter()
    X = ca.SX.sym("X", n, N + 1)
    U = ca.SX.sym("U", m, N)
    J, g, rows = 0, [], []

    def add(values, kind):
        g.extend(values)
        rows.append((kind, len(values)))

    add([X[i, 0] - model.x0[i] for i in range(n)], "eq")
    for k in range(N):
        xk, uk = X[:, k], U[:, k]
        J += model.ell(xk, uk, ca)
        add([X[i, k + 1] - fi for i, fi in enumerate(model.f(xk, uk, ca))], "eq")
        add(model.g(xk, uk, ca), "eq")
        add(model.h(xk, uk, ca), "ineq")
    J += model.phi(X[:, N], ca)
    add(model.g_T(X[:, N], ca), "eq")
    add(model.h_T(X[:, N], ca), "ineq")
    # vec is column-major: X(0), X(1), … then u(0), u(1), …
    nlp = {"x": ca.vertcat(ca.vec(X), ca.vec(U)), "f": J, "g": ca.vertcat(*g)}
    solver = ca.nlpsol("ipopt_ms", "ipopt", nlp, IPOPT_OPTIONS)
    lbg, ubg = _casadi_bounds(model, rows)
    free = np.full(n * (N + 1), np.inf)
    lbx = np.concatenate([-free, np.tile(model.lower, N)])
    ubx = np.concatenate([free, np.tile(model.upper, N)])
    setup = time.perf_counter() - t0

    def run(u0):
        w0 = np.concatenate([rollout_np(model, u0).ravel(), np.asarray(u0).ravel()])
        sol = solver(x0=w0, lbx=lbx, ubx=ubx, lbg=lbg, ubg=ubg)
        stats = solver.stats()
        u = np.asarray(sol["x"]).ravel()[n * (N + 1) :].reshape(N, m)
        return (
            u,
            bool(stats["success"]),
            {
                "iterations": int(stats.get("iter_count", -1)),
                "status": stats["return_status"],
            },
        )

    return run, setup


def _ipopt_ss(model: _Model, ca):
    m, N = model.m, model.N
    t0 = time.perf_counter()
    U = ca.SX.sym("U", m, N)
    x = ca.SX(ca.DM(model.x0))
    J, g, rows = 0, [], []

    def add(values, kind):
        g.extend(values)
        rows.append((kind, len(values)))

    for k in range(N):
        uk = U[:, k]
        J += model.ell(x, uk, ca)
        add(model.g(x, uk, ca), "eq")
        add(model.h(x, uk, ca), "ineq")
        x = ca.vertcat(*model.f(x, uk, ca))
    J += model.phi(x, ca)
    add(model.g_T(x, ca), "eq")
    add(model.h_T(x, ca), "ineq")
    nlp = {"x": ca.vec(U), "f": J, "g": ca.vertcat(*g)}
    solver = ca.nlpsol("ipopt_ss", "ipopt", nlp, IPOPT_OPTIONS)
    lbg, ubg = _casadi_bounds(model, rows)
    lbx, ubx = np.tile(model.lower, N), np.tile(model.upper, N)
    setup = time.perf_counter() - t0

    def run(u0):
        sol = solver(x0=np.asarray(u0).ravel(), lbx=lbx, ubx=ubx, lbg=lbg, ubg=ubg)
        stats = solver.stats()
        u = np.asarray(sol["x"]).ravel().reshape(N, m)
        return (
            u,
            bool(stats["success"]),
            {
                "iterations": int(stats.get("iter_count", -1)),
                "status": stats["return_status"],
            },
        )

    return run, setup


def _slsqp(model: _Model, problem):
    from scipy.optimize import Bounds, minimize

    from adjoint import control

    N, m = model.N, model.m
    t0 = time.perf_counter()
    vg = jax.jit(jax.value_and_grad(lambda v: problem.cost(v.reshape(N, m))))

    def groups(v):
        vals = control.constraint_values(problem, v.reshape(N, m))
        eq = jnp.concatenate([vals.equality.reshape(-1), vals.terminal_equality])
        ineq = jnp.concatenate([vals.inequality.reshape(-1), vals.terminal_inequality])
        return eq, ineq

    constraints = []
    v0 = jnp.zeros(N * m)
    for i, kind in ((0, "eq"), (1, "ineq")):
        size = groups(v0)[i].size
        if size == 0:
            continue
        sign = 1.0 if kind == "eq" else -1.0  # SciPy: eq = 0, ineq ≥ 0
        fun = jax.jit(lambda v, i=i, s=sign: s * groups(v)[i])
        jac = jax.jit(jax.jacfwd(lambda v, i=i, s=sign: s * groups(v)[i]))
        fun(v0), jac(v0)  # compile
        constraints.append(
            {
                "type": kind,
                "fun": lambda x, fun=fun: np.asarray(fun(jnp.asarray(x))),
                "jac": lambda x, jac=jac: np.asarray(jac(jnp.asarray(x))),
            }
        )

    def fun(x):
        v, gr = vg(jnp.asarray(x))
        return float(v), np.asarray(gr, np.float64)

    fun(np.zeros(N * m))  # compile
    bounds = Bounds(np.tile(model.lower, N), np.tile(model.upper, N))
    setup = time.perf_counter() - t0

    def run(u0):
        deadline = time.perf_counter() + SLSQP_TIME_LIMIT
        timed_out = []

        def callback(intermediate_result):
            if time.perf_counter() > deadline:
                timed_out.append(True)
                raise StopIteration

        res = minimize(
            fun,
            np.asarray(u0, float).ravel(),
            jac=True,
            method="SLSQP",
            bounds=bounds,
            constraints=constraints,
            callback=callback,
            options=SLSQP_OPTIONS,
        )
        status = f"time limit {SLSQP_TIME_LIMIT:g} s" if timed_out else str(res.message)
        return (
            res.x.reshape(N, m),
            bool(res.success) and not timed_out,
            {
                "iterations": int(res.nit),
                "status": status,
            },
        )

    return run, setup


def _trajax(model: _Model, problem):
    from trajax import optimizers

    N = model.N
    lower, upper = jnp.asarray(model.lower), jnp.asarray(model.upper)
    p, q, p_T, q_T = problem.constraint_sizes
    last = lambda t: t == N

    def cost(x, u, t):  # trajax: t = 0 … N, u(N) = 0 padded; the terminal cost at t = N
        return jnp.where(last(t), problem.phi(x), problem.ell(x, u, jnp.minimum(t, N - 1)))

    def dynamics(x, u, t):
        return problem.f(x, u, t)

    def equality(x, u, t):
        k = jnp.minimum(t, N - 1)
        parts = [jnp.zeros(1)]
        if p:
            parts.append(jnp.where(last(t), 0.0, problem.equality(x, u, k)))
        if p_T:
            parts.append(jnp.where(last(t), problem.terminal_equality(x), 0.0))
        return jnp.concatenate(parts)

    def inequality(x, u, t):
        k = jnp.minimum(t, N - 1)
        parts = [u - upper, lower - u]
        if q:
            parts.append(jnp.where(last(t), -1.0, problem.inequality(x, u, k)))
        if q_T:
            parts.append(jnp.where(last(t), problem.terminal_inequality(x), -1.0))
        return jnp.concatenate(parts)

    @jax.jit
    def solve(U):
        out = optimizers.constrained_ilqr(
            cost, dynamics, problem.x0[0], U, equality, inequality, **TRAJAX_OPTIONS
        )
        return out[1], out[7], out[11]

    def run(u0):
        U, viol, it = jax.block_until_ready(solve(jnp.asarray(u0)))
        ok = bool(np.isfinite(viol)) and float(viol) <= TRAJAX_OPTIONS["constraints_threshold"]
        return np.asarray(U), ok, {"iterations": int(it)}

    t0 = time.perf_counter()
    run(np.zeros((model.N, model.m)))  # compile
    return run, time.perf_counter() - t0


# --------------------------------------------------------------------------- the suite
def _bench(name: str, N: int, n_starts: int, rounds: int, casadi, use_trajax: bool) -> dict:
    print(f"[constraints] {name} N={N} ...", flush=True)
    model = _Model(name, N)
    problem = model.problem()
    errors = verify_models(model, problem, casadi)
    solvers, setup = {}, {}
    solvers["ours"], setup["ours"] = _ours(model, problem)
    if casadi is not None:
        solvers["ipopt-ms"], setup["ipopt-ms"] = _ipopt_ms(model, casadi)
        solvers["ipopt-ss"], setup["ipopt-ss"] = _ipopt_ss(model, casadi)
    solvers["slsqp"], setup["slsqp"] = _slsqp(model, problem)
    if use_trajax:
        solvers["trajax"], setup["trajax"] = _trajax(model, problem)
    u_starts = starts(model, n_starts)
    # one untimed call of each IPOPT (first-call overheads; ours and SLSQP's JAX
    # functions were called when compiled), then the timed rounds
    first = next(iter(u_starts.values()))
    for sname in ("ipopt-ms", "ipopt-ss"):
        if sname in solvers:
            solvers[sname](first)
    runs = {s: {k: {"times_s": []} for k in u_starts} for s in solvers}
    for r in range(rounds):
        for key, u0 in u_starts.items():
            for sname, run in solvers.items():
                rec = runs[sname][key]
                if r > 0 and not (rec["solved"] and rec["times_s"][0] <= REPEAT_BELOW):
                    continue  # failed or slow runs are timed once (module docstring)
                t0 = time.perf_counter()
                u, success, info = run(u0)
                dt = time.perf_counter() - t0
                rec["times_s"].append(dt)
                if r == 0:  # deterministic solvers: the answer of round 0 is every round's
                    judged = check(model, u)
                    rec.update(info)
                    rec.update(judged)
                    rec["success"] = success
                    rec["solved"] = bool(success and judged["violation"] <= FEASIBLE)
    summary = {}
    for sname in solvers:
        recs = runs[sname]
        solved = [k for k in u_starts if recs[k]["solved"]]
        med = lambda k, recs=recs: statistics.median(recs[k]["times_s"])
        row = {
            "solved": len(solved),
            "starts": len(u_starts),
            "median_time_s": statistics.median(med(k) for k in solved) if solved else None,
            "median_time_all_s": statistics.median(med(k) for k in u_starts),
            "median_cost": statistics.median(recs[k]["cost"] for k in solved) if solved else None,
            "max_violation": max(recs[k]["violation"] for k in u_starts),
            "setup_s": setup[sname],
        }
        both = [k for k in solved if runs["ours"][k]["solved"]]
        ratios = [
            a / b for k in both for a, b in zip(runs["ours"][k]["times_s"], recs[k]["times_s"])
        ]
        row["ours_over_solver"] = statistics.median(ratios) if ratios else None
        row["ratio_starts"] = len(both)
        summary[sname] = row
    return {
        "problem": name,
        "N": N,
        "dt": model.dt,
        "n": model.n,
        "m": model.m,
        "model_check_max_rel_error": errors,
        "summary": summary,
        "runs": runs,
    }


def _trajax_version() -> str:
    try:
        from importlib.metadata import version

        return version("trajax")
    except Exception:  # a source checkout on the path: no distribution metadata
        return "source checkout (no version)"


LABELS = {
    "ours": "ours (control.solve)",
    "ipopt-ms": "IPOPT multiple shooting",
    "ipopt-ss": "IPOPT single shooting",
    "slsqp": "SciPy SLSQP",
    "trajax": "trajax constrained_ilqr",
}


def run(quick: bool = False, sizes=None, n_starts: int | None = None, rounds=None) -> dict:
    """`sizes`: (problem, N) pairs (default quick: cartpole_track and car_obstacle at
    N = 25; full: cartpole_track N = 25, 50, 100, 200 and car_obstacle
    N = 25, 50, 100)."""
    if sizes is None:
        if quick:
            sizes = [("cartpole_track", 25), ("car_obstacle", 25)]
        else:
            sizes = [("cartpole_track", N) for N in (25, 50, 100, 200)]
            sizes += [("car_obstacle", N) for N in (25, 50, 100)]
    n_starts = n_starts or (3 if quick else 6)
    rounds = rounds or (1 if quick else 3)
    try:
        import casadi
    except ImportError:
        casadi = None
    use_trajax = importlib.util.find_spec("trajax") is not None
    load_start = os.getloadavg()[0]
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        results = [_bench(name, N, n_starts, rounds, casadi, use_trajax) for name, N in sizes]
    finally:
        jax.config.update("jax_enable_x64", previous)
    meta = metadata()
    meta["load_average_1min_at_start"] = load_start
    meta["load_average_1min_at_end"] = os.getloadavg()[0]
    import scipy

    meta["scipy"] = scipy.__version__
    meta["XLA_FLAGS"] = os.environ.get("XLA_FLAGS")
    meta["cpu_affinity"] = (
        sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    )
    meta["casadi"] = None if casadi is None else casadi.__version__
    meta["trajax"] = _trajax_version() if use_trajax else None
    data = {
        "meta": meta,
        "quick": quick,
        "dtype": "float64",
        "sizes": {"problems": [list(s) for s in sizes], "starts": n_starts, "rounds": rounds},
        "feasible_if_violation_le": FEASIBLE,
        "start_scale": START_SCALE,
        "options": {
            "ours": "control.solve(problem, u, throw=False): AugmentedLagrangian() defaults",
            "ipopt": {k: v for k, v in IPOPT_OPTIONS.items()},
            "slsqp": {**SLSQP_OPTIONS, "time_limit_s": SLSQP_TIME_LIMIT},
            "repeat_below_s": REPEAT_BELOW,
            "trajax": TRAJAX_OPTIONS if use_trajax else None,
        },
        "problem_constants": {"cartpole_track": CARTPOLE, "car_obstacle": CAR},
        "results": results,
    }

    def fmt(x, spec=".3g"):
        return "-" if x is None else format(x, spec)

    rows = []
    for res in results:
        for sname, row in res["summary"].items():
            ratio = row["ours_over_solver"]
            rows.append(
                [
                    res["problem"],
                    res["N"],
                    LABELS[sname],
                    f"{row['solved']}/{row['starts']}",
                    fmt(row["median_time_s"]),
                    fmt(row["median_cost"], ".6g"),
                    f"{row['max_violation']:.1e}",
                    "" if sname == "ours" else fmt(ratio, ".2g") + ("×" if ratio else ""),
                    fmt(row["setup_s"], ".2g"),
                ]
            )
    notes = []
    if casadi is None:
        notes.append("casadi is not installed (`pip install adjoint-jax[bench]`): no IPOPT rows.")
    if use_trajax:
        notes.append(
            f"trajax ({meta['trajax']}): `constrained_ilqr` with the box as inequalities, "
            + ", ".join(f"`{k} = {v:g}`" for k, v in TRAJAX_OPTIONS.items())
            + "; success = its violation ≤ `constraints_threshold`; timed after `jax.jit`."
        )
    else:
        notes.append("trajax is not importable (not on PyPI): no trajax rows.")
    md = "\n".join(
        [
            "# General constraints: time to a feasible optimum" + (" (quick)" if quick else ""),
            "",
            f"{meta['date']}; {meta['device']} ({meta['cpu_count']} cores, shared; 1-min load "
            f"{load_start:.1f} at start, {meta['load_average_1min_at_end']:.1f} at end); "
            f"jax {meta['jax']}; casadi {meta['casadi']}; scipy {meta['scipy']}; float64; "
            f"XLA_FLAGS={meta['XLA_FLAGS'] or '(unset)'}; process pinned to CPU(s) "
            f"{meta['cpu_affinity']}.",
            "",
            f"Problems: `cartpole_track` (N Δt = {CARTPOLE['duration']} s, terminal equality "
            f"upright, |p| ≤ {CARTPOLE['track']}, |u| ≤ {CARTPOLE['u_max']}) and `car_obstacle` "
            f"(N Δt = {CAR['duration']} s, goal at rest, obstacle disc, |κ|, |a| ≤ 2). Starts: "
            f"u = 0 and {n_starts - 1} uniform random controls in ±{START_SCALE} × the box; "
            f"{rounds} round(s), solvers interleaved per start.",
            "",
            "A run is *solved* when one independent NumPy check of its controls (rollout, "
            f"constraints, box) gives violation ≤ {FEASIBLE:g} and the solver reports success "
            "(ours: `Solution.converged`; IPOPT: `stats()['success']`; SLSQP: `res.success`). "
            "Time: median over the solved starts of the median over rounds (wall clock of "
            "one solve call). Ours is timed after `jax.jit` compilation and one warm-up "
            "call; the compile (ours, SLSQP's JAX functions) or CasADi's `nlpsol` "
            "construction is the 'setup' column, not in the times. 'ours ÷ solver': median "
            "over (start, round) of the same round's time ratio, on the starts both solved "
            "(< 1: ours faster). Cost: median final cost of the solved runs (different "
            "starts may reach different local optima).",
            "",
            md_table(
                [
                    "problem",
                    "N",
                    "solver",
                    "solved",
                    "median time (s)",
                    "median cost",
                    "max violation (all starts)",
                    "ours ÷ solver",
                    "setup (s)",
                ],
                rows,
            ),
            "",
            *(["Notes: " + " ".join(notes), ""] if notes else []),
            "IPOPT: exact Hessians (CasADi SX), `tol = 1e-8`, MUMPS, wall-time limit "
            f"{IPOPT_OPTIONS['ipopt.max_wall_time']:g} s; multiple shooting starts from the "
            "controls' rollout. SLSQP: single shooting, `ftol = 1e-10`, `maxiter = 500`, "
            f"cost/constraint Jacobians from jitted JAX, stopped after {SLSQP_TIME_LIMIT:g} s "
            "(counted unsolved). Runs that failed, or took over "
            f"{REPEAT_BELOW:g} s, are timed in the first round only. The CasADi and "
            "NumPy models agree with `adjoint.problems` to ≤ 1e-12 (checked in the run). "
            "The machine is shared with other jobs: single timings can be several times "
            "slower than on an idle machine; the round-by-round ratio is more robust.",
        ]
    )
    write_results("constraints_quick" if quick else "constraints", data, md)
    return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    run(quick=args.quick)
    name = "constraints_quick.md" if args.quick else "constraints.md"
    print((_common.RESULTS / name).read_text())
