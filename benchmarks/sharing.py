"""Shared weights and convolution: gradient time and memory.

1. A tied stage (`SharedDense`, W[i, j] = u[index[i, j]]) against the untied `Dense` of
   the same W size, both differentiated by the costate recursion (target: overhead
   ≤ 10%). Tie patterns: a symmetric W (n(n+1)/2 free parameters) and a random tie
   pattern with n²/8 free parameters.
2. Convolution's structured path (`Conv`: forward with `lax.conv_general_dilated`,
   costate with the transposed convolutions) against `jax.grad` through a plain
   function calling `lax.conv_general_dilated` (target: ≤ 1.0×), and the tied dense
   matrix (`SharedDense(conv_index(...))`) at a small image size to show why the
   structured path exists.

float32, tanh, squared-error cost; medians of interleaved runs after warm-up.

    python -m benchmarks.sharing [--quick]
"""

import argparse
import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import adjoint as aj

from ._common import compiled_memory, interleaved_medians, md_table, metadata, write_results


def _grad_fn(system, x0, target, wrt_input: bool = False):
    """(args, jitted gradient): with respect to the controls, and X(0) if `wrt_input`
    (then the stage computes B(k-1) = Wᵀ Y, as every stage but the first does)."""
    params, static = eqx.partition(system, eqx.is_inexact_array)

    def loss(p, x):
        return jnp.sum((target - eqx.combine(p, static)(x)) ** 2)

    return (params, x0), jax.jit(jax.grad(loss, argnums=(0, 1) if wrt_input else 0))


def _mb(mem):
    return (mem.get("temp_bytes") or 0) / 2**20


def tied_vs_untied(n: int, batch: int, repeats: int, key) -> list[dict]:
    k1, k2, k3, k4 = jax.random.split(key, 4)
    x0 = jax.random.normal(k1, (batch, n), jnp.float32)
    target = jax.random.normal(k2, (batch, n), jnp.float32)
    rng = np.random.default_rng(0)
    patterns = {
        "symmetric": aj.symmetric_index(n),
        "random n^2/8": aj.tie_index(rng.integers(0, n * n // 8, size=(n, n))),
    }
    untied = aj.Multistage([aj.Dense(n, n, dtype=jnp.float32, key=k3)])
    rows = []
    for (name, imap), wrt_input in itertools.product(patterns.items(), (False, True)):
        tied = aj.Multistage([aj.SharedDense.random(imap, dtype=jnp.float32, key=k4)])
        p_u, g_u = _grad_fn(untied, x0, target, wrt_input)
        p_t, g_t = _grad_fn(tied, x0, target, wrt_input)
        t = interleaved_medians({"untied": lambda: g_u(*p_u), "tied": lambda: g_t(*p_t)}, repeats)
        rows.append(
            {
                "pattern": name,
                "position": "interior (B(k-1) needed)" if wrt_input else "first (no B(0))",
                "n": n,
                "batch": batch,
                "free_parameters": imap.num_weights,
                "untied_s": t["untied"],
                "tied_s": t["tied"],
                "tied_over_untied": t["tied"] / t["untied"],
                "untied_temp_mb": _mb(compiled_memory(g_u, *p_u)),
                "tied_temp_mb": _mb(compiled_memory(g_t, *p_t)),
            }
        )
        r = rows[-1]
        print(
            f"tied ({name}, {r['position']}) n={n}: tied/untied = {r['tied_over_untied']:.3f}",
            flush=True,
        )
    return rows


def _plain_conv_loss(params, x0, target, strides, pads):
    a = x0
    for kernel, bias, stride, pad in zip(params[0], params[1], strides, pads):
        a = jax.lax.conv_general_dilated(a, kernel, stride, pad)
        a = jnp.tanh(a + bias[:, None, None])
    return jnp.sum((target - a) ** 2)


def conv_paths(size: int, channels: int, batch: int, repeats: int, key, dense: bool) -> dict:
    """Two 3×3 convolutions (SAME, then stride 2) on (channels, size, size) images."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    c1 = aj.Conv((channels, size, size), channels, 3, padding="SAME", dtype=jnp.float32, key=k1)
    c2 = aj.Conv(c1.out_shape, channels, 3, stride=2, padding="SAME", dtype=jnp.float32, key=k2)
    x0 = jax.random.normal(k3, (batch, channels, size, size), jnp.float32)
    target = jax.random.normal(k4, (batch, *c2.out_shape), jnp.float32)
    structured = aj.Multistage([c1, c2])
    p_s, g_s = _grad_fn(structured, x0, target)
    plain_params = ((c1.kernel, c2.kernel), (c1.bias, c2.bias))
    # X(0) is an argument of both (a closed-over input lets XLA constant-fold its layout
    # change in one and not the other).
    g_p = jax.jit(
        jax.grad(
            lambda p, x: _plain_conv_loss(
                p, x, target, (c1.stride, c2.stride), (c1.padding, c2.padding)
            )
        )
    )
    fns = {"jax_grad": lambda: g_p(plain_params, x0), "structured": lambda: g_s(*p_s)}
    if dense:
        tied = aj.Multistage([c1.to_shared_dense(), c2.to_shared_dense()])
        p_d, g_d = _grad_fn(tied, x0.reshape(batch, -1), target.reshape(batch, -1))
        fns["tied_dense"] = lambda: g_d(*p_d)
    t = interleaved_medians(fns, repeats)
    row = {
        "image": f"{channels}x{size}x{size}",
        "batch": batch,
        "jax_grad_s": t["jax_grad"],
        "structured_s": t["structured"],
        "structured_over_jax_grad": t["structured"] / t["jax_grad"],
        "jax_grad_temp_mb": _mb(compiled_memory(g_p, plain_params, x0)),
        "structured_temp_mb": _mb(compiled_memory(g_s, *p_s)),
        "tied_dense_s": t.get("tied_dense"),
        "tied_dense_temp_mb": _mb(compiled_memory(g_d, *p_d)) if dense else None,
        "tied_dense_matrix_entries": (
            int(np.prod(c1.out_shape)) * int(np.prod(c1.in_shape))
            + int(np.prod(c2.out_shape)) * int(np.prod(c2.in_shape))
        ),
    }
    print(
        f"conv {row['image']} batch {batch}: structured/jax.grad = "
        f"{row['structured_over_jax_grad']:.3f}"
        + (f", tied dense {1e3 * t['tied_dense']:.1f} ms" if dense else ""),
        flush=True,
    )
    return row


def run(quick: bool = False) -> dict:
    key = jax.random.key(0)
    repeats = 7 if quick else 25
    tied_cases = ((128, 64), (256, 256)) if quick else ((256, 256), (512, 256), (512, 1024))
    tied_rows = []
    for n, batch in tied_cases:
        tied_rows += tied_vs_untied(n, batch, 3 * repeats, jax.random.fold_in(key, n))
    conv_cases = (
        [(12, 4, 16, True), (32, 8, 16, False)]
        if quick
        else [(16, 8, 32, True), (32, 16, 64, False), (64, 16, 32, False)]
    )
    conv_rows = [
        conv_paths(s, c, b, repeats, jax.random.fold_in(key, 1000 + s), d)
        for s, c, b, d in conv_cases
    ]
    data = {
        "suite": "sharing",
        "metadata": metadata(),
        "quick": quick,
        "repeats": repeats,
        "sizes": {"dtype": "float32", "activation": "tanh", "tied_n_batch": tied_cases},
        "tied": tied_rows,
        "conv": conv_rows,
        "targets": {"tied_over_untied_max": 1.10, "structured_over_jax_grad_max": 1.0},
    }
    meta = data["metadata"]
    md = [
        "## Shared weights and convolution (float32, tanh)",
        "",
        f"{meta['date']}; {meta['device']} ({meta['cpu_count']} cores); jax {meta['jax']}; "
        f"median of {repeats} interleaved runs after warm-up ({3 * repeats} for the tied "
        "stage); temp = XLA compiled temporary memory of the jitted gradient. The machine's "
        "2 cores were shared with other jobs: sub-millisecond ratios vary by ±10–20% "
        "between runs.",
        "",
        "Tied `SharedDense` vs untied `Dense` (same n × n W; both via the costate "
        "recursion; target tied/untied ≤ 1.10). The tied stage adds one gather (W = u[index]) "
        "and one scatter-add (the pull-back into u) of n² entries per step, independent of "
        "the batch; the matrix products scale with the batch:",
        "",
        md_table(
            [
                "pattern",
                "stage",
                "n",
                "batch",
                "free params",
                "untied ms",
                "tied ms",
                "tied/untied",
                "temp MB (untied / tied)",
            ],
            [
                [
                    r["pattern"],
                    r["position"],
                    r["n"],
                    r["batch"],
                    r["free_parameters"],
                    1e3 * r["untied_s"],
                    1e3 * r["tied_s"],
                    r["tied_over_untied"],
                    f"{r['untied_temp_mb']:.2f} / {r['tied_temp_mb']:.2f}",
                ]
                for r in tied_rows
            ],
        ),
        "",
        "Two 3×3 conv stages (SAME, then stride 2): `Conv` (structured path) vs `jax.grad` "
        "through `lax.conv_general_dilated` (target ≤ 1.0×), and the tied dense matrix "
        "where small enough:",
        "",
        md_table(
            [
                "image",
                "batch",
                "jax.grad ms",
                "Conv ms",
                "Conv/jax.grad",
                "temp MB (jax.grad / Conv)",
                "tied dense ms",
                "tied dense temp MB",
                "dense W entries",
            ],
            [
                [
                    r["image"],
                    r["batch"],
                    1e3 * r["jax_grad_s"],
                    1e3 * r["structured_s"],
                    r["structured_over_jax_grad"],
                    f"{r['jax_grad_temp_mb']:.2f} / {r['structured_temp_mb']:.2f}",
                    "-" if r["tied_dense_s"] is None else f"{1e3 * r['tied_dense_s']:.2f}",
                    "-" if r["tied_dense_temp_mb"] is None else f"{r['tied_dense_temp_mb']:.2f}",
                    r["tied_dense_matrix_entries"],
                ]
                for r in conv_rows
            ],
        ),
    ]
    write_results("sharing_quick" if quick else "sharing", data, "\n".join(md))
    return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    run(quick=parser.parse_args().quick)
