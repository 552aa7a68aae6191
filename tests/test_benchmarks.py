"""The benchmark entry point runs a tiny subset and writes JSON, Markdown and PNG; the
gradients the suites time are those of plain forwards written here, and every reported
ratio is the ratio of the reported times."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adjoint
from benchmarks import _common
from benchmarks.__main__ import main


def _committed_tables():
    return {p.name: p.read_bytes() for p in sorted(_common.COMMITTED.iterdir())}


def test_quick_costate_suite_writes_results(tmp_path, monkeypatch):
    """By default results go to ./adjoint-bench in the working directory; the committed
    tables are left untouched."""
    before = _committed_tables()
    monkeypatch.chdir(tmp_path)
    assert main(["--quick", "--only", "costate"]) == 0
    assert _committed_tables() == before
    tmp_path = tmp_path / "adjoint-bench"
    data = json.loads((tmp_path / "costate_quick.json").read_text())
    assert data["metadata"]["jax"] and data["sizes"]["width"] == 64
    assert [(r["layout"], r["depth"]) for r in data["timings"]] == [
        (layout, n) for layout in ("tuple", "stacked") for n in (4, 16)
    ]
    md = (tmp_path / "costate_quick.md").read_text()
    for row in data["timings"]:
        assert row["costate_s"] > 0 and row["jax_grad_s"] > 0 and row["forward_s"] > 0
        assert row["costate_over_jax_grad"] == row["costate_s"] / row["jax_grad_s"]
        assert row["costate_over_forward"] == row["costate_s"] / row["forward_s"]
        for key in ("costate_over_jax_grad", "costate_over_forward"):  # the table prints them
            assert f" {row[key]:.3g} |" in md
        assert row["costate_temp_bytes"] > 0 and row["jax_grad_temp_bytes"] > 0
    assert {r["layout"] for r in data["compile"]} == {"tuple", "stacked"}
    assert "costate/jax.grad" in md
    assert (tmp_path / "costate_quick.png").read_bytes()[:4] == b"\x89PNG"
    assert "Benchmark summary" in (tmp_path / "summary_quick.md").read_text()


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _rel(a, b):
    la, lb = jax.tree.leaves(_f64(a)), jax.tree.leaves(_f64(b))
    assert len(la) == len(lb)
    return max(np.abs(x - y).max() for x, y in zip(la, lb)) / max(np.abs(y).max() for y in lb)


@pytest.mark.parametrize("layout", ["tuple", "stacked"])
def test_costate_benchmark_times_the_gradient_of_its_forward(layout):
    """The functions `benchmarks.costate` times: its forward is C = Σ (D − X(N))² of the
    MLP written here with jnp, and both its gradients (costate recursion, jax.grad of
    the plain forward) are jax.grad of that, in float64 (float32 runs: measured ≤ 6.5e-8)."""
    from benchmarks import costate

    key = jax.random.key(0)
    x0 = jax.random.normal(jax.random.fold_in(key, 1), (8, 6), jnp.float32)
    target = jax.random.normal(jax.random.fold_in(key, 2), (8, 6), jnp.float32)
    cs = costate.build(3, 6, layout, adjoint.CostateAdjoint(), key)
    ad = eqx.tree_at(lambda s: s.adjoint, cs, adjoint.AutodiffAdjoint())
    p, forward, g_cs = costate._fns(cs, x0, target)
    p_ad, _, g_ad = costate._fns(ad, x0, target)
    assert p.stages is not None and isinstance(cs.adjoint, adjoint.CostateAdjoint)

    def plain(weights, biases):
        x = jnp.asarray(x0, jnp.float64)
        for w, b in zip(weights, biases):
            x = jnp.tanh(x @ w.T + b)
        return jnp.sum((jnp.asarray(target, jnp.float64) - x) ** 2)

    if layout == "stacked":
        ws, bs = list(p.stages.weight), list(p.stages.bias)
    else:
        ws, bs = [s.weight for s in p.stages], [s.bias for s in p.stages]
    ws, bs = _f64(ws), _f64(bs)
    value, (gw, gb) = jax.value_and_grad(plain, argnums=(0, 1))(ws, bs)
    assert abs(float(forward(p)) - float(value)) < 1e-5 * float(value)
    for timed in (g_cs(p), g_ad(p_ad)):
        if layout == "stacked":
            got = (list(timed.stages.weight), list(timed.stages.bias))
        else:
            got = ([s.weight for s in timed.stages], [s.bias for s in timed.stages])
        assert _rel(got, (gw, gb)) < 1e-5


def test_sharing_benchmark_paths_compute_one_gradient():
    """`benchmarks.sharing` times the structured `Conv` against jax.grad of its plain
    `lax.conv` loss, and a tied `SharedDense` against an untied `Dense`: the conv paths
    give one gradient, and the tied one is that of W = u[index] written here."""
    from benchmarks import sharing

    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    c1 = adjoint.Conv((2, 6, 6), 2, 3, padding="SAME", dtype=jnp.float32, key=k1)
    c2 = adjoint.Conv(c1.out_shape, 2, 3, stride=2, padding="SAME", dtype=jnp.float32, key=k2)
    x0 = jax.random.normal(k3, (3, 2, 6, 6), jnp.float32)
    target = jax.random.normal(k4, (3, *c2.out_shape), jnp.float32)
    args, g_structured = sharing._grad_fn(adjoint.Multistage([c1, c2]), x0, target)
    structured = g_structured(*args)
    plain = jax.grad(sharing._plain_conv_loss)(
        ((c1.kernel, c2.kernel), (c1.bias, c2.bias)),
        x0,
        target,
        (c1.stride, c2.stride),
        (c1.padding, c2.padding),
    )
    got = ((structured.stages[0].kernel, structured.stages[1].kernel),) + (
        (structured.stages[0].bias, structured.stages[1].bias),
    )
    assert _rel(got, plain) < 1e-5  # float32: measured 1.8e-7

    imap = adjoint.symmetric_index(5)
    tied = adjoint.SharedDense.random(imap, dtype=jnp.float32, key=k1)
    x = jax.random.normal(k2, (4, 5), jnp.float32)
    d = jax.random.normal(k3, (4, 5), jnp.float32)
    args, g_tied = sharing._grad_fn(adjoint.Multistage([tied]), x, d, wrt_input=True)
    grads, g_x = g_tied(*args)
    index = np.asarray(imap.weight_index)

    def tied_loss(u, b, x):
        w = u[index]
        return jnp.sum((jnp.asarray(d, jnp.float64) - jnp.tanh(x @ w.T + b)) ** 2)

    ref = jax.grad(tied_loss, argnums=(0, 1, 2))(*_f64((tied.u, tied.bias, x)))
    assert _rel((grads.stages[0].u, grads.stages[0].bias, g_x), ref) < 1e-5  # measured 8.8e-8


def test_recurrent_benchmark_variants_compute_one_gradient():
    """Every variant `benchmarks.recurrent` times returns the gradient of its baseline,
    jax.grad through the plain `lax.scan` of the Elman cell."""
    from benchmarks import recurrent

    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    cell = adjoint.ElmanCell(3, 4, dtype=jnp.float64, key=k1)
    h0 = jax.random.normal(k2, (2, 4))
    xs = jax.random.normal(k3, (9, 2, 3))
    target = jax.random.normal(k4, (2, 4))
    ref = jax.grad(lambda c: jnp.sum((target - recurrent._plain_final(c, h0, xs)) ** 2))(cell)
    for net in (
        adjoint.RecurrentNet(cell),
        adjoint.RecurrentNet(cell, checkpoint_every=3),
        adjoint.RecurrentNet(cell, checkpoint_every=3, adjoint=adjoint.AutodiffAdjoint()),
    ):
        params, static = eqx.partition(net, eqx.is_inexact_array)
        g = jax.grad(lambda p: jnp.sum((target - eqx.combine(p, static)(h0, xs)) ** 2))(params)
        inexact = lambda t: eqx.filter(t, eqx.is_inexact_array)  # noqa: E731
        assert _rel(inexact(g.cell), inexact(ref)) < 1e-13  # float64: measured 2.7e-16


def _committed(name):
    path = _common.COMMITTED / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_committed_ratios_are_ratios_of_their_times(quick):
    """The committed tables (which the README quotes): each ratio is the ratio of the
    times reported beside it, each throughput is work / time, each crossover the first
    size where the reported speedup passes its threshold."""
    suffix = "_quick" if quick else ""
    approx = lambda v: pytest.approx(v, rel=1e-12)  # noqa: E731
    checked = 0
    if data := _committed("costate" + suffix):
        for r in data["timings"]:
            assert r["costate_over_jax_grad"] == approx(r["costate_s"] / r["jax_grad_s"])
            assert r["costate_over_forward"] == approx(r["costate_s"] / r["forward_s"])
        checked += 1
    if data := _committed("sharing" + suffix):
        for r in data["tied"]:
            assert r["tied_over_untied"] == approx(r["tied_s"] / r["untied_s"])
        for r in data["conv"]:
            assert r["structured_over_jax_grad"] == approx(r["structured_s"] / r["jax_grad_s"])
        checked += 1
    if data := _committed("recurrent" + suffix):
        base = {r["T"]: r["time_s"] for r in data["rows"] if r["variant"] == "jax.grad(scan)"}
        for r in data["rows"]:
            assert r["over_jax_grad"] == approx(r["time_s"] / base[r["T"]])
        checked += 1
    if data := _committed("fit" + suffix):
        for r in data["timings"]:
            assert r["ratio"] == approx(r["loop_s"] / r["fit_s"])
            assert r["ratio_indexed"] == approx(r["loop_indexed_s"] / r["fit_s"])
            for name in ("fit", "loop", "loop_indexed"):
                work = r["steps"] * r["batch"]
                assert r[f"{name}_patterns_per_s"] == approx(work / r[f"{name}_s"])
        checked += 1
    for name, threshold in (("parallel_costates", 1.0), ("parallel_riccati", 1.1)):
        if data := _committed(name + suffix):
            for r in data["results"]:
                assert r["speedup"] == approx(r["sequential_s"] / r["parallel_s"])
            for problem, n in data["crossover_N"].items():
                faster = [
                    r["N"]
                    for r in data["results"]
                    if r["problem"] == problem and r["speedup"] > threshold
                ]
                assert n == (min(faster) if faster else None)
            checked += 1
    if data := _committed("ctrnn" + suffix):
        t = {r["method"]: r["median_s"] for r in data["rows"]}
        for r in data["rows"]:
            if r["median_s"] is not None:
                assert r["ratio_to_unrolled_T200"] == approx(r["median_s"] / t["unrolled T=200"])
        lean = t["implicit (fixed point)"]
        assert data["targets"]["ratio_to_unrolled_T200"] == approx(lean / t["unrolled T=200"])
        assert data["targets"]["speedup_vs_optimistix_vmapped"] == approx(
            t["optimistix vmapped"] / lean
        )
        checked += 1
    if (data := _committed("continuous_costates" + suffix)) and "results" in data:
        import statistics

        for result in data["results"]:
            t = {r["method"]: r["times_s"] for r in result["rows"]}
            for r in result["rows"]:  # medians of per-round ratios to the forward
                rounds = zip(r["times_s"], t["forward solve"])
                assert r["x_forward"] == approx(statistics.median(a / b for a, b in rounds))
                assert r["median_s"] == approx(statistics.median(r["times_s"]))
        rows = {r["method"]: r for r in data["results"][len(data["results"]) // 2]["rows"]}
        ours = rows["ReversibleAdjoint · Reversible(Tsit5) (ours)"]
        assert data["targets"]["ours_x_forward"] == ours["x_forward"]
        checked += 1
    if data := _committed("control" + suffix):
        for result in data["results"]:
            rows = result["methods"]
            assert result["c_best"] == min(v["final_cost"] for v in rows.values())
            assert result["target"] == approx(
                result["c_best"] + data["rtol"] * abs(result["c_best"])
            )
            for meth in ("ilqr", "ddp"):
                for base in ("lbfgsb", "steepest_descent"):
                    speedup = rows[meth][f"speedup_vs_{base}"]
                    if rows[meth]["reached"] and rows[base]["reached"]:  # per-round ratios
                        import statistics

                        rounds = zip(rows[base]["times_s"], rows[meth]["times_s"])
                        assert speedup == approx(statistics.median(b / a for b, a in rounds))
                    elif rows[meth]["reached"]:
                        assert speedup == approx(rows[base]["time_s"] / rows[meth]["time_s"])
                    else:
                        assert speedup is None
            for v in rows.values():
                assert v["reached"] == (v["final_cost"] <= result["target"])
        checked += 1
    if not quick and (data := _committed("implicit")):
        for r in data["results"]:
            temp = r["temp_bytes"]
            assert r["unrolled_over_ours_memory"] == approx(
                temp["unrolled_value_and_grad"] / temp["value_and_grad"]
            )
            assert r["vjp_fraction"] == approx(r["value_and_grad_over_solve"] - 1)
        checked += 1
    assert checked >= 8
