"""Training throughput: `adjoint.fit` against a plain hand-written jax.jit(jax.grad) + optax loop.

The same model (a `Multistage` of tanh `Dense` stages, float32, differentiated by the
costate recursion), the same data, the same minibatch size and the same optimiser (Adam)
in both. The baseline is the loop most users write: one `jax.jit`-compiled step
(value_and_grad + optax update) per minibatch, the minibatch gathered from device arrays
with indices of a NumPy permutation per epoch. `fit` runs `steps_per_dispatch` steps
(default 100) per compiled call. Throughput is patterns per second (steps × batch size /
wall time), the median of interleaved repeats after a warm-up run of each. The warm-up
includes compilation, which is therefore excluded from both.

    python -m benchmarks.fit [--quick]

Targets: fit/loop ≥ 1.0 for every size, ≥ 2 for the small model.
"""

import argparse
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import adjoint as aj

from ._common import interleaved_medians, md_table, metadata, save_figure, write_results


def _model(sizes, key):
    keys = jax.random.split(key, len(sizes) - 1)
    stages = [
        aj.Dense(a, b, "tanh", dtype=jnp.float32, key=k)
        for a, b, k in zip(sizes[:-1], sizes[1:], keys)
    ]
    return aj.Multistage(stages)


def _loss(model, batch):
    x, d = batch
    return jnp.mean(jnp.sum((d - model(x)) ** 2, axis=-1))


def _data(sizes, n, key):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, sizes[0]), jnp.float32)
    w = jax.random.normal(kw, (sizes[0], sizes[-1]), jnp.float32) / sizes[0] ** 0.5
    return x, jnp.tanh(x @ w)


def make_step(static, optimizer):
    """The textbook step: jax.jit(value_and_grad) + optax, controls and state as arguments."""

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: _loss(eqx.combine(p, static), batch))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, loss

    return step


def make_indexed_step(static, optimizer):
    """The same step taking the minibatch indices: the gather happens inside the jit, so
    each step is exactly one dispatch (the strongest plain loop)."""

    @jax.jit
    def step(params, opt_state, data, idx):
        batch = jax.tree.map(lambda a: a[idx], data)
        loss, grads = jax.value_and_grad(lambda p: _loss(eqx.combine(p, static), batch))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, loss

    return step


def hand_loop(step, params, optimizer, data, steps, batch_size, seed=0, indexed=False):
    """The plain loop: one compiled step per minibatch, minibatches drawn with a NumPy
    permutation per epoch and gathered from device arrays (outside the step, or inside it
    when `indexed`)."""
    opt_state = optimizer.init(params)
    x, d = data
    n = x.shape[0]
    per_epoch = n // batch_size
    rng = np.random.default_rng(seed)
    perm = None
    loss = None
    for s in range(steps):
        i = s % per_epoch
        if i == 0:
            perm = rng.permutation(n)
        idx = perm[i * batch_size : (i + 1) * batch_size]
        if indexed:
            params, opt_state, loss = step(params, opt_state, data, idx)
        else:
            params, opt_state, loss = step(params, opt_state, (x[idx], d[idx]))
    return params, loss


def _load():
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def run(quick: bool = False) -> dict:
    if quick:
        configs = [
            ("small", (2, 16, 16, 1), 4096, 32, 1000),
            ("large", (128, 512, 512, 10), 4096, 256, 20),
        ]
        repeats = 5
    else:
        configs = [
            ("small", (2, 16, 16, 1), 8192, 32, 3000),
            ("medium", (32, 128, 128, 10), 8192, 128, 500),
            ("large", (512, 1024, 1024, 10), 8192, 512, 40),
        ]
        repeats = 5
    optimizer = optax.adam(1e-3)
    key = jax.random.key(0)
    load_before = _load()
    rows = []
    for name, sizes, n, batch, steps in configs:
        model = _model(sizes, jax.random.fold_in(key, 1))
        data = _data(sizes, n, jax.random.fold_in(key, 2))
        fkey = jax.random.key(3)

        def run_fit():
            res = aj.fit(
                model,
                _loss,
                data,
                optimizer,
                steps=steps,
                batch_size=batch,
                key=fkey,
                progress=False,
            )
            return eqx.filter(res.model, eqx.is_array), res.history["loss"][-1]

        params, static = eqx.partition(model, eqx.is_inexact_array)
        step = make_step(static, optimizer)

        istep = make_indexed_step(static, optimizer)

        def run_loop():
            return hand_loop(step, params, optimizer, data, steps, batch)

        def run_loop_indexed():
            return hand_loop(istep, params, optimizer, data, steps, batch, indexed=True)

        t = interleaved_medians(
            {"fit": run_fit, "loop": run_loop, "loop_indexed": run_loop_indexed}, repeats
        )
        fit_loss = float(run_fit()[1])
        loop_loss = float(run_loop()[1])
        row = {
            "model": name,
            "sizes": "-".join(map(str, sizes)),
            "patterns": n,
            "batch": batch,
            "steps": steps,
            "fit_s": t["fit"],
            "loop_s": t["loop"],
            "fit_patterns_per_s": steps * batch / t["fit"],
            "loop_patterns_per_s": steps * batch / t["loop"],
            "loop_indexed_s": t["loop_indexed"],
            "loop_indexed_patterns_per_s": steps * batch / t["loop_indexed"],
            "ratio": t["loop"] / t["fit"],
            "ratio_indexed": t["loop_indexed"] / t["fit"],
            "fit_final_loss": fit_loss,
            "loop_final_loss": loop_loss,
        }
        rows.append(row)
        print(
            f"{name:6s} {row['sizes']:>16s} batch {batch:4d}: fit {row['fit_patterns_per_s']:.3g} "
            f"patterns/s, loop {row['loop_patterns_per_s']:.3g} patterns/s, "
            f"loop (gather in jit) {row['loop_indexed_patterns_per_s']:.3g} patterns/s, "
            f"ratios {row['ratio']:.2f} / {row['ratio_indexed']:.2f}",
            flush=True,
        )

    data = {
        "suite": "fit",
        "metadata": metadata(),
        "sizes": {
            "dtype": "float32",
            "activation": "tanh",
            "optimizer": "adam",
            "steps_per_dispatch": 100,
        },
        "repeats": repeats,
        "quick": quick,
        "load_average_1min": {"before": load_before, "after": _load()},
        "timings": rows,
        "targets": {"ratio_min": 1.0, "ratio_small_min": 2.0},
    }
    meta = data["metadata"]
    md = [
        "## Training throughput: adjoint.fit vs a hand-written jax.jit(jax.grad) + optax loop",
        "",
        f"{meta['date']}; {meta['device']} ({meta['cpu_count']} cores); jax {meta['jax']}; "
        f"float32, tanh, Adam; fit with steps_per_dispatch=100; median of {repeats} "
        "interleaved runs after warm-up (compilation excluded); 1-minute load average "
        f"{data['load_average_1min']['before']} before, {data['load_average_1min']['after']} "
        "after (other jobs shared the machine when it exceeds the core count).",
        "",
        md_table(
            [
                "model",
                "sizes",
                "batch",
                "steps",
                "fit patterns/s",
                "loop A patterns/s",
                "loop B patterns/s",
                "fit/A",
                "fit/B",
                "target",
            ],
            [
                [
                    r["model"],
                    r["sizes"],
                    r["batch"],
                    r["steps"],
                    r["fit_patterns_per_s"],
                    r["loop_patterns_per_s"],
                    r["loop_indexed_patterns_per_s"],
                    r["ratio"],
                    r["ratio_indexed"],
                    "≥ 2" if r["model"] == "small" else "≥ 1",
                ]
                for r in rows
            ],
        ),
        "",
        "Loop A: `x[idx]` gathered outside the jitted step (the usual loop, three dispatches "
        "per step). Loop B: indices passed in, gather inside the jitted step (one dispatch "
        "per step; the strongest plain loop). Final losses of fit and loop agree in "
        "magnitude (see JSON); the minibatch orders differ (different seeds).",
    ]
    suffix = "_quick" if quick else ""
    write_results(f"fit{suffix}", data, "\n".join(md))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.8))
        xs = np.arange(len(rows))
        w = 0.27
        for off, col, label in (
            (-w, "loop_patterns_per_s", "loop A (gather outside jit)"),
            (0.0, "loop_indexed_patterns_per_s", "loop B (gather inside jit)"),
            (w, "fit_patterns_per_s", "adjoint.fit"),
        ):
            ax.bar(xs + off, [r[col] for r in rows], w, label=label)
        ax.set_xticks(xs, [f"{r['model']}\n{r['sizes']}" for r in rows])
        ax.set_yscale("log")
        ax.set_ylabel("patterns / s")
        ax.set_title(f"training throughput ({meta['device']})")
        ax.legend(fontsize=8)
        save_figure(f"fit{suffix}", fig)
    except ImportError:
        pass
    return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a minute on a CPU")
    args = parser.parse_args()
    run(quick=args.quick)
