"""Back-propagation through time: `RecurrentNet` against `jax.grad` through `lax.scan`.

An Elman cell H(t) = tanh(W H(t-1) + V I(t) + b), float32, cost on H(T), for T in
{100, 1000}. Variants, all in the same run:

- `jax.grad(scan)`: `jax.grad` through a plain `lax.scan` (the baseline);
- `jax.grad(scan)+remat k`: the same with `jax.checkpoint` on segments of k steps
  (`RecurrentNet(..., adjoint=AutodiffAdjoint(), checkpoint_every=k)`);
- `costate`: `RecurrentNet`'s costate recursion, all states stored;
- `costate+ckpt k`: the recursion storing every k-th state, recomputing segments.

k = round(√T). Reported: median time, ratio to the baseline, and XLA's compiled
temporary memory of the jitted gradient against T.

    python -m benchmarks.recurrent [--quick]
"""

import argparse
import math

import equinox as eqx
import jax
import jax.numpy as jnp

import adjoint as aj

from ._common import (
    compiled_memory,
    interleaved_medians,
    md_table,
    metadata,
    save_figure,
    write_results,
)


def _plain_final(cell, h0, xs):
    def step(h, x):
        return jnp.tanh(h @ cell.weight_hh.T + x @ cell.weight_ih.T + cell.bias), None

    return jax.lax.scan(step, h0, xs)[0]


def case(t: int, hidden: int, features: int, batch: int, repeats: int, key) -> list[dict]:
    k1, k2, k3, k4 = jax.random.split(key, 4)
    cell = aj.ElmanCell(features, hidden, dtype=jnp.float32, key=k1)
    h0 = jax.random.normal(k2, (batch, hidden), jnp.float32)
    xs = jax.random.normal(k3, (t, batch, features), jnp.float32)
    target = jax.random.normal(k4, (batch, hidden), jnp.float32)
    k = max(1, round(math.sqrt(t)))

    def loss_plain(c):
        return jnp.sum((target - _plain_final(c, h0, xs)) ** 2)

    def make(net):
        params, static = eqx.partition(net, eqx.is_inexact_array)

        def loss(p):
            return jnp.sum((target - eqx.combine(p, static)(h0, xs)) ** 2)

        return params, jax.jit(jax.grad(loss))

    variants = {"jax.grad(scan)": (cell, jax.jit(jax.grad(loss_plain)))}
    variants[f"jax.grad(scan)+remat {k}"] = make(
        aj.RecurrentNet(cell, checkpoint_every=k, adjoint=aj.AutodiffAdjoint())
    )
    variants["costate"] = make(aj.RecurrentNet(cell))
    variants[f"costate+ckpt {k}"] = make(aj.RecurrentNet(cell, checkpoint_every=k))
    fns = {name: (lambda p=p, g=g: g(p)) for name, (p, g) in variants.items()}
    times = interleaved_medians(fns, repeats)
    base = times["jax.grad(scan)"]
    rows = []
    for name, (p, g) in variants.items():
        mem = compiled_memory(g, p)
        rows.append(
            {
                "T": t,
                "variant": name,
                "time_s": times[name],
                "over_jax_grad": times[name] / base,
                "temp_bytes": mem.get("temp_bytes"),
            }
        )
        print(
            f"T={t:5d} {name:24s} {1e3 * times[name]:8.2f} ms  x{times[name] / base:.2f}  "
            f"temp {(mem.get('temp_bytes') or 0) / 2**20:.2f} MB",
            flush=True,
        )
    return rows


def run(quick: bool = False) -> dict:
    hidden, features, batch = (32, 8, 16) if quick else (128, 32, 64)
    repeats = 5 if quick else 15
    key = jax.random.key(0)
    rows = []
    for t in (100, 1000):
        rows += case(t, hidden, features, batch, repeats, jax.random.fold_in(key, t))
    data = {
        "suite": "recurrent",
        "metadata": metadata(),
        "quick": quick,
        "repeats": repeats,
        "sizes": {"hidden": hidden, "features": features, "batch": batch, "dtype": "float32"},
        "rows": rows,
        "targets": {"costate_over_jax_grad_max": 1.0},
    }
    meta = data["metadata"]
    md = [
        "## Recurrent net (BPTT) vs jax.grad through lax.scan (Elman, tanh, float32)",
        "",
        f"{meta['date']}; {meta['device']} ({meta['cpu_count']} cores); jax {meta['jax']}; "
        f"hidden {hidden}, input {features}, batch {batch}; cost on H(T); median of "
        f"{repeats} interleaved runs after warm-up; temp = XLA compiled temporary memory "
        "of the jitted gradient; k = round(√T).",
        "",
        md_table(
            ["T", "variant", "ms", "× jax.grad(scan)", "temp MB"],
            [
                [
                    r["T"],
                    r["variant"],
                    1e3 * r["time_s"],
                    r["over_jax_grad"],
                    (r["temp_bytes"] or 0) / 2**20,
                ]
                for r in rows
            ],
        ),
    ]
    name = "recurrent_quick" if quick else "recurrent"
    write_results(name, data, "\n".join(md))
    _plot(name, rows)
    return data


def _plot(name: str, rows: list[dict]) -> None:
    """Time and memory against the sequence length T, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for variant in dict.fromkeys(
        r["variant"].split("+")[0] + ("+ckpt" if "+" in r["variant"] else "") for r in rows
    ):
        rs = [
            r
            for r in rows
            if (r["variant"].split("+")[0] + ("+ckpt" if "+" in r["variant"] else "")) == variant
        ]
        ts = [r["T"] for r in rs]
        ax[0].loglog(ts, [1e3 * r["time_s"] for r in rs], marker="o", label=variant)
        ax[1].loglog(ts, [(r["temp_bytes"] or 1) / 2**20 for r in rs], marker="o", label=variant)
    ax[0].set(xlabel="sequence length T", ylabel="median ms", title="gradient time")
    ax[1].set(xlabel="sequence length T", ylabel="XLA temp MiB", title="memory")
    for a in ax:
        a.legend(fontsize=7)
    save_figure(name, fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    run(quick=parser.parse_args().quick)
