"""The costate recursion against `jax.grad` of the same plain forward pass.

MLPs of depth N, width 256, batch 256, float32 (tanh), in both layouts (tuple: unrolled;
stacked: `lax.scan`). For each: median times of the forward pass, `jax.grad` through the
plain forward (`AutodiffAdjoint`) and the costate recursion (`CostateAdjoint`), their
ratios, XLA's compiled temporary memory, and compile times.

    python -m benchmarks.costate [--quick]
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp

import adjoint as aj

from ._common import (
    compile_seconds,
    compiled_memory,
    interleaved_medians,
    md_table,
    metadata,
    save_figure,
    write_results,
)


def build(depth: int, width: int, layout: str, adjoint, key):
    keys = jax.random.split(key, depth)
    make = lambda k: aj.Dense(width, width, "tanh", dtype=jnp.float32, key=k)
    if layout == "stacked":
        return aj.Multistage(eqx.filter_vmap(make)(keys), adjoint=adjoint)
    return aj.Multistage([make(k) for k in keys], adjoint=adjoint)


def _fns(system, x0, target):
    params, static = eqx.partition(system, eqx.is_inexact_array)

    def loss(p):
        return jnp.sum((target - eqx.combine(p, static)(x0)) ** 2)

    forward = jax.jit(loss)
    grad = jax.jit(jax.grad(loss))
    return params, forward, grad


def run(quick: bool = False) -> dict:
    width, batch = (64, 64) if quick else (256, 256)
    depths = (4, 16) if quick else (4, 16, 64)
    compile_depths = (16, 64) if quick else (16, 64, 256)
    repeats = 5 if quick else 30
    key = jax.random.key(0)
    x0 = jax.random.normal(jax.random.fold_in(key, 1), (batch, width), jnp.float32)
    target = jax.random.normal(jax.random.fold_in(key, 2), (batch, width), jnp.float32)

    rows = []
    for layout in ("tuple", "stacked"):
        for depth in depths:
            cs = build(depth, width, layout, aj.CostateAdjoint(), key)
            ad = eqx.tree_at(lambda s: s.adjoint, cs, aj.AutodiffAdjoint())
            p, fwd, g_cs = _fns(cs, x0, target)
            p_ad, _, g_ad = _fns(ad, x0, target)
            t = interleaved_medians(
                {
                    "forward": lambda: fwd(p),
                    "jax_grad": lambda: g_ad(p_ad),
                    "costate": lambda: g_cs(p),
                },
                repeats,
            )
            mem_cs = compiled_memory(g_cs, p)
            mem_ad = compiled_memory(g_ad, p_ad)
            rows.append(
                {
                    "layout": layout,
                    "depth": depth,
                    "forward_s": t["forward"],
                    "jax_grad_s": t["jax_grad"],
                    "costate_s": t["costate"],
                    "costate_over_jax_grad": t["costate"] / t["jax_grad"],
                    "costate_over_forward": t["costate"] / t["forward"],
                    "costate_temp_bytes": mem_cs.get("temp_bytes"),
                    "jax_grad_temp_bytes": mem_ad.get("temp_bytes"),
                }
            )
            r = rows[-1]
            print(
                f"{layout:8s} N={depth:3d}  costate/jax.grad = {r['costate_over_jax_grad']:.3f}"
                f"  grad/forward = {r['costate_over_forward']:.2f}",
                flush=True,
            )

    compile_rows = []
    for layout in ("tuple", "stacked"):
        for depth in compile_depths:
            row = {"layout": layout, "depth": depth}
            for name, adj in (("costate", aj.CostateAdjoint()), ("jax_grad", aj.AutodiffAdjoint())):
                system = build(depth, width, layout, adj, key)
                p, _, g = _fns(system, x0, target)
                row[f"{name}_compile_s"] = compile_seconds(g, p)
            compile_rows.append(row)
            print(
                f"compile {layout:8s} N={depth:3d}  costate {row['costate_compile_s']:.2f}s",
                flush=True,
            )

    data = {
        "suite": "costate",
        "metadata": metadata(),
        "sizes": {"width": width, "batch": batch, "dtype": "float32", "activation": "tanh"},
        "repeats": repeats,
        "quick": quick,
        "timings": rows,
        "compile": compile_rows,
        "targets": {
            "costate_over_jax_grad_at_N>=16": 0.8,
            "costate_over_jax_grad_max": 1.0,
            "gradient_over_forward_max": 3.0,
        },
    }
    meta = data["metadata"]
    md = [
        "## Costate recursion vs jax.grad (MLP, tanh, float32)",
        "",
        f"{meta['date']}; {meta['device']} ({meta['cpu_count']} cores); jax {meta['jax']}; "
        f"width {width}, batch {batch}; median of {repeats} interleaved runs after warm-up.",
        "",
        md_table(
            [
                "layout",
                "N",
                "forward ms",
                "jax.grad ms",
                "costate ms",
                "costate/jax.grad",
                "grad/forward",
                "costate temp MB",
                "jax.grad temp MB",
            ],
            [
                [
                    r["layout"],
                    r["depth"],
                    1e3 * r["forward_s"],
                    1e3 * r["jax_grad_s"],
                    1e3 * r["costate_s"],
                    r["costate_over_jax_grad"],
                    r["costate_over_forward"],
                    (r["costate_temp_bytes"] or 0) / 2**20,
                    (r["jax_grad_temp_bytes"] or 0) / 2**20,
                ]
                for r in rows
            ],
        ),
        "",
        "Compile time (s) of the jitted gradient:",
        "",
        md_table(
            ["layout", "N", "costate", "jax.grad"],
            [
                [r["layout"], r["depth"], r["costate_compile_s"], r["jax_grad_compile_s"]]
                for r in compile_rows
            ],
        ),
    ]
    name = "costate_quick" if quick else "costate"
    write_results(name, data, "\n".join(md))
    _plot(name, rows)
    return data


def _plot(name: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for layout, style in (("tuple", "-"), ("stacked", "--")):
        rs = [r for r in rows if r["layout"] == layout]
        n = [r["depth"] for r in rs]
        for key, label in (
            ("forward_s", "forward"),
            ("jax_grad_s", "jax.grad"),
            ("costate_s", "costate"),
        ):
            ax[0].loglog(
                n, [1e3 * r[key] for r in rs], style, marker="o", label=f"{label} ({layout})"
            )
        for key, label in (("jax_grad_temp_bytes", "jax.grad"), ("costate_temp_bytes", "costate")):
            ax[1].loglog(
                n,
                [(r[key] or 1) / 2**20 for r in rs],
                style,
                marker="o",
                label=f"{label} ({layout})",
            )
    ax[0].set(xlabel="depth N", ylabel="median time (ms)", title="time against depth")
    ax[1].set(xlabel="depth N", ylabel="XLA temp memory (MiB)", title="memory against depth")
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
