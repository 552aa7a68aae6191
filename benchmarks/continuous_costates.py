"""Continuous-time costates: our backward costate ODE against diffrax's adjoints.

    python -m benchmarks.continuous_costates [--quick]

Problem (the issue's sizes): dX/dt = tanh(W X + b), n = 128, a batch of 64 initial
states, float32, Tsit5 with 1000 fixed steps on [0, 1], C = Σ_p |D_p − X_p(1)|². We time
`jax.jit` of: the forward solve alone (the unit), and dC/d(W, b) by

- `costate ODE (ours)`: `adjoint.trajectory_cost`, whose custom VJP integrates Hamilton's
  equations (X, B, ∫∂H/∂W) backward with the same solver (optimise-then-discretise);
- `costate ODE (ours, Bosh3 backward)`: the same, with the costate ODE discretised by
  the third-order `diffrax.Bosh3()` (3 evaluations a step instead of Tsit5's 6): an
  optimise-then-discretise choice that trades O(dt³) gradient error for speed;
- `BacksolveAdjoint`: `jax.grad` through `diffeqsolve(..., adjoint=BacksolveAdjoint())`;
- `RecursiveCheckpointAdjoint`: `jax.grad` through the discretised solve (diffrax's
  default, discretise-then-optimise).

Median of interleaved repeats after a warm-up (`block_until_ready`); memory is XLA's
compiled temp bytes; gradient differences are relative to RecursiveCheckpointAdjoint.
Target (issue 5): ≤ 3.5× the forward at no more memory than BacksolveAdjoint.
"""

import argparse

import diffrax
import jax
import jax.numpy as jnp

import adjoint as adj

from ._common import compiled_memory, interleaved_medians, md_table, metadata, write_results


def _vector_field(t, x, params):
    w, b = params
    return jnp.tanh(x @ w.T + b)


def run(quick: bool = False) -> dict:
    n, batch, steps = (64, 16, 200) if quick else (128, 64, 1000)
    repeats = 3 if quick else 5
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    w = jax.random.normal(k1, (n, n), jnp.float32) / n**0.5
    b = 0.1 * jax.random.normal(k2, (n,), jnp.float32)
    x0 = jax.random.normal(k3, (batch, n), jnp.float32)
    target = 0.5 * jax.random.normal(k4, (batch, n), jnp.float32)
    params = (w, b)
    dt0 = 1.0 / steps

    def terminal(x):
        return jnp.sum((target - x) ** 2)

    kwargs = dict(t0=0.0, t1=1.0, dt0=dt0, terminal_cost=terminal, max_steps=steps)

    def forward(params, x0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_vector_field),
            diffrax.Tsit5(),
            0.0,
            1.0,
            dt0,
            x0,
            args=params,
            saveat=diffrax.SaveAt(t1=True),
            max_steps=steps,
        )
        return terminal(sol.ys[-1])

    def dto(adjoint):
        def cost(params, x0):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(_vector_field),
                diffrax.Tsit5(),
                0.0,
                1.0,
                dt0,
                x0,
                args=params,
                saveat=diffrax.SaveAt(t1=True),
                adjoint=adjoint,
                max_steps=steps,
            )
            return terminal(sol.ys[-1])

        return jax.grad(cost)

    fns = {
        "forward solve": jax.jit(forward),
        "costate ODE (ours)": jax.jit(
            jax.grad(lambda p, x: adj.trajectory_cost(_vector_field, p, x, **kwargs))
        ),
        "costate ODE (ours, Bosh3 backward)": jax.jit(
            jax.grad(
                lambda p, x: adj.trajectory_cost(
                    _vector_field, p, x, backward_solver=diffrax.Bosh3(), **kwargs
                )
            )
        ),
        "BacksolveAdjoint": jax.jit(dto(diffrax.BacksolveAdjoint())),
        "RecursiveCheckpointAdjoint": jax.jit(dto(diffrax.RecursiveCheckpointAdjoint())),
    }
    memory = {name: compiled_memory(f, params, x0) for name, f in fns.items()}
    times = interleaved_medians({k: (lambda f=f: f(params, x0)) for k, f in fns.items()}, repeats)
    reference = fns["RecursiveCheckpointAdjoint"](params, x0)

    def rel(g):
        return float(
            max(jnp.max(jnp.abs(a - r)) / jnp.max(jnp.abs(r)) for a, r in zip(g, reference))
        )

    t_fwd = times["forward solve"]
    rows = [
        {
            "method": name,
            "median_s": times[name],
            "x_forward": times[name] / t_fwd,
            "temp_MB": memory[name].get("temp_bytes", float("nan")) / 2**20,
            "rel_diff_vs_recursive_checkpoint": None
            if name == "forward solve"
            else rel(fns[name](params, x0)),
        }
        for name in fns
    ]
    ours, ours_bosh3 = rows[1], rows[2]
    targets = {
        "ours_x_forward": ours["x_forward"],
        "le_3.5x_forward": ours["x_forward"] <= 3.5,
        "ours_bosh3_backward_x_forward": ours_bosh3["x_forward"],
        "bosh3_backward_le_3.5x_forward": ours_bosh3["x_forward"] <= 3.5,
        "memory_le_backsolve": max(
            memory["costate ODE (ours)"]["temp_bytes"],
            memory["costate ODE (ours, Bosh3 backward)"]["temp_bytes"],
        )
        <= memory["BacksolveAdjoint"]["temp_bytes"],
    }
    data = {
        "meta": metadata(),
        "quick": quick,
        "sizes": {"n": n, "batch": batch, "steps": steps, "solver": "Tsit5", "dtype": "float32"},
        "repeats": repeats,
        "rows": rows,
        "targets": targets,
    }
    meta = data["meta"]
    md = [
        f"# Continuous-time costates{' (quick)' if quick else ''}",
        "",
        f"{meta['date']} · {meta['device']} ({meta['cpu_count']} cores) · jax {meta['jax']} · "
        f"dX/dt = tanh(W X + b), n = {n}, batch = {batch}, {steps} fixed Tsit5 steps, "
        f"float32 · median of {repeats} interleaved repeats.",
        "",
        md_table(
            [
                "method",
                "median (ms)",
                "× forward",
                "XLA temp (MB)",
                "rel. diff vs RecursiveCheckpoint",
            ],
            [
                [
                    r["method"],
                    r["median_s"] * 1e3,
                    r["x_forward"],
                    r["temp_MB"],
                    "—"
                    if r["rel_diff_vs_recursive_checkpoint"] is None
                    else r["rel_diff_vs_recursive_checkpoint"],
                ]
                for r in rows
            ],
        ),
        "",
        "Targets: "
        + ", ".join(
            f"{k} = {v:.3g}" if isinstance(v, float) else f"{k}: {'met' if v else 'MISSED'}"
            for k, v in targets.items()
        ),
    ]
    name = "continuous_costates_quick" if quick else "continuous_costates"
    write_results(name, data, "\n".join(md))
    print("\n".join(md))
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a minute on a CPU")
    args = parser.parse_args(argv)
    run(quick=args.quick)


if __name__ == "__main__":
    main()
