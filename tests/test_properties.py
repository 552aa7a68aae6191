"""Property-based tests (hypothesis): random cascades of stages, random costs on random
states, float32 and float64.

For each drawn system the costate gradient (`costates(...).grads` and `jax.grad` through
the custom VJP of `Multistage.trajectory`), the costates B(k) and B(0) equal those of an
independent plain forward pass written here with jnp operations on the system's arrays
(no stage of the library is called: X(k) = F(W X(k-1) + b) with W and b read as arrays,
W = u[index] for shared weights, W = A Bᵀ for transformed ones, the skip connections'
concatenations written out), differentiated by `jax.grad` in float64. B(k) = −dC/dX(k) is
obtained by adding a zero perturbation δ_k to X(k) in the plain forward and differentiating
with respect to δ_k. `kkt_residuals` vanish at the recursion's states and costates, and
its ∂L/∂W is the gradient.

CI runs a derandomised profile with a fixed, small number of examples ("ci", the
default); `HYPOTHESIS_PROFILE=nightly` runs many more. Sizes come from a small set, so
that JAX compiles few distinct shapes.
"""

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import adjoint as aj


settings.register_profile(
    "ci",
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "nightly",
    max_examples=300,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SIZES = (2, 3)
ACTIVATIONS = ("tanh", "sigmoid", "relu", "identity", "mixing")
# relative tolerance of a float64 result, and of a float32 result against the float64
# reference (see `_close`), ~200× the worst cases measured over 300 random examples:
# 2.4e-16 and 2.7e-7
TOL = {jnp.float64: 5e-14, jnp.float32: 5e-5}


def _mixing(a):
    """A non-elementwise activation (it mixes the units of a pattern)."""
    return jnp.tanh(a) / jnp.sqrt(1.0 + jnp.mean(a**2))


PLAIN_ACTIVATIONS = {
    "tanh": jnp.tanh,
    "sigmoid": lambda a: 1 / (1 + jnp.exp(-a)),
    "relu": lambda a: jnp.where(a > 0, a, 0.0),  # F'(0) = 0, as jax.nn.relu's
    "identity": lambda a: a,
    "mixing": _mixing,
}


def _low_rank(controls):
    a, b = controls
    return a @ b.T


# ------------------------------------------------------------------------ strategies


@st.composite
def stage_specs(draw, in_size: int, kinds: tuple[str, ...]):
    kind = draw(st.sampled_from(kinds))
    out = in_size if kind == "residual" else draw(st.sampled_from(SIZES))
    return {
        "kind": kind,
        "in": in_size,
        "out": out,
        "activation": draw(st.sampled_from(ACTIVATIONS)),
        "bias": draw(st.booleans()),
    }


@st.composite
def systems(draw):
    """A system spec: layout, dtype, stages, patterns, the cost's terms, a seed."""
    layout = draw(st.sampled_from(("tuple", "stacked", "skip")))
    depth = draw(st.integers(1, 3))
    n0 = draw(st.sampled_from(SIZES))
    stages, reads, sizes = [], [], [n0]
    if layout == "stacked":  # one stage repeated: square, one activation, one bias choice
        act, bias = draw(st.sampled_from(ACTIVATIONS)), draw(st.booleans())
        stages = [{"kind": "dense", "in": n0, "out": n0, "activation": act, "bias": bias}] * depth
        reads = [(k,) for k in range(depth)]
        sizes = [n0] * (depth + 1)
    else:
        for k in range(1, depth + 1):
            if layout == "skip":
                extra = draw(st.sets(st.integers(0, k - 2), max_size=2)) if k >= 2 else set()
                r = (k - 1,) + tuple(sorted(extra))
            else:
                r = (k - 1,)
            n_in = sum(sizes[j] for j in r)
            kinds = ("dense", "shared", "transformed") + (("residual",) if len(r) == 1 else ())
            spec = draw(stage_specs(n_in, kinds))
            stages.append(spec)
            reads.append(r)
            sizes.append(spec["out"])
    terms = draw(
        st.lists(
            st.tuples(
                st.integers(0, depth),
                st.sampled_from(("squared", "cos", "quartic", "coupled")),
                st.floats(0.1, 2.0),
            ),
            min_size=1,
            max_size=3,
        )
    )
    terms.append((depth, "squared", 1.0))  # X(N) always enters the cost
    return {
        "layout": layout,
        "dtype": draw(st.sampled_from((jnp.float32, jnp.float64))),
        "stages": stages,
        "reads": reads,
        "sizes": sizes,
        "patterns": draw(st.sampled_from((None, 3))),
        "terms": terms,
        "weight_decay": draw(st.sampled_from((0.0, 0.05))),
        "seed": draw(st.integers(0, 2**16)),
    }


# ------------------------------------------------------------------------ build both


def _build_stage(spec, dtype, key, rng):
    act = _mixing if spec["activation"] == "mixing" else spec["activation"]
    n_in, n_out = spec["in"], spec["out"]
    k1, k2, k3 = jax.random.split(key, 3)
    if spec["kind"] in ("dense", "residual"):
        stage = aj.Dense(n_in, n_out, act, use_bias=spec["bias"], dtype=dtype, key=k1)
        return aj.Residual(stage) if spec["kind"] == "residual" else stage
    bias = jax.random.uniform(k2, (n_out,), dtype, -0.5, 0.5) if spec["bias"] else None
    if spec["kind"] == "shared":
        q = max(1, n_in * n_out // 2)
        index = rng.integers(-1, q, size=(n_out, n_in))  # −1: a fixed zero connection
        u = jax.random.uniform(k1, (q,), dtype, -1.0, 1.0)
        return aj.SharedDense(index, u, bias, activation=act)
    controls = (
        jax.random.uniform(k1, (n_out, 2), dtype, -1.0, 1.0),
        jax.random.uniform(k3, (n_in, 2), dtype, -1.0, 1.0),
    )
    return aj.Transformed(_low_rank, controls, bias, activation=act)


def build(spec):
    dtype = spec["dtype"]
    key = jax.random.key(spec["seed"])
    rng = np.random.default_rng(spec["seed"])
    keys = jax.random.split(key, len(spec["stages"]) + 2)
    if spec["layout"] == "stacked":
        s = spec["stages"][0]
        act = _mixing if s["activation"] == "mixing" else s["activation"]
        stacked = eqx.filter_vmap(
            lambda k: aj.Dense(s["in"], s["in"], act, use_bias=s["bias"], dtype=dtype, key=k)
        )(keys[: len(spec["stages"])])
        system = aj.Multistage(stacked)
    else:
        stages = [_build_stage(s, dtype, k, rng) for s, k in zip(spec["stages"], keys)]
        if spec["layout"] == "skip":
            system = aj.skip_network(stages, spec["reads"], in_size=spec["sizes"][0])
        else:
            system = aj.Multistage(stages)
    shape = (spec["sizes"][0],) if spec["patterns"] is None else (3, spec["sizes"][0])
    x0 = jax.random.normal(keys[-1], shape, dtype)
    return system, x0


def _targets(spec):
    rng = np.random.default_rng(spec["seed"] + 1)
    return [rng.normal(size=n) for n in spec["sizes"]]


def _term(kind, x, target, weight):
    if kind == "squared":
        return weight * jnp.sum((x - target) ** 2)
    if kind == "cos":
        return weight * jnp.sum(jnp.cos(2 * x + target))
    if kind == "quartic":
        return 0.1 * weight * jnp.sum(x**4)
    return weight * jnp.sum(x[..., 0] * x[..., -1] * target[0])  # couples two units


def plain_cost(spec, xs):
    """C on the plain states X(0..N): a sum of random terms on random states."""
    targets = _targets(spec)
    return sum(_term(kind, xs[k], targets[k], w) for k, kind, w in spec["terms"])


def library_cost(spec):
    """The same C on the states as `system.trajectory` returns them."""
    sizes = spec["sizes"]

    def cost(states):
        # a skip network's augmented state Z(k) holds X(k) first
        xs = [states[k][..., : sizes[k]] for k in range(len(sizes))]
        return plain_cost(spec, xs)

    return cost


def _decay(spec):
    if spec["weight_decay"] == 0.0:
        return None
    return lambda s: (
        spec["weight_decay"]
        * sum(jnp.sum(w**2) for w in jax.tree.leaves(eqx.filter(s, eqx.is_inexact_array)))
    )


def _plain_stage(spec, p, static, x):
    """One stage with jnp operations on its arrays: p its inexact arrays (float64), static
    the library stage (read for integer index maps only)."""
    if spec["kind"] == "residual":
        p = p.g
    if spec["kind"] in ("dense", "residual"):
        w, b = p.weight, p.bias
    elif spec["kind"] == "shared":
        index = np.asarray(static.index)
        w = jnp.where(index >= 0, p.u[np.maximum(index, 0)], 0.0)
        b = p.bias
    else:
        a, c = p.controls
        w, b = a @ c.T, p.bias
    pre = x @ w.T + (0.0 if b is None else b)
    act = PLAIN_ACTIVATIONS[spec["activation"]]
    y = jax.vmap(act)(pre) if pre.ndim == 2 else act(pre)
    return x + y if spec["kind"] == "residual" else y


def plain_states(spec, system, params, x0, deltas):
    """X(0..N), X(k) = f_k(reads) + δ_k, from the float64 arrays `params`."""
    xs = [x0 + deltas[0]]
    for k, (s, r) in enumerate(zip(spec["stages"], spec["reads"]), start=1):
        x_in = jnp.concatenate([xs[j] for j in r], axis=-1)
        if spec["layout"] == "stacked":
            p = jax.tree.map(lambda a: a[k - 1], params.stages)
            static = None
        else:
            p, static = params.stages[k - 1], system.stages[k - 1]
            if spec["layout"] == "skip":
                p, static = p.stage, static.stage
        xs.append(_plain_stage(s, p, static, x_in) + deltas[k])
    return xs


def _float64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, tree)


def reference(spec, system, x0):
    """C, dC/dW, B(1..N) and B(0) of the plain forward, by jax.grad in float64."""
    params = _float64(eqx.filter(system, eqx.is_inexact_array))
    x0 = x0.astype(jnp.float64)
    decay = _decay(spec)
    deltas = [jnp.zeros(x0.shape[:-1] + (n,)) for n in spec["sizes"]]

    def total(params, deltas):
        c = plain_cost(spec, plain_states(spec, system, params, x0, deltas))
        return c if decay is None else c + decay(params)

    value, (g, d) = jax.value_and_grad(total, argnums=(0, 1))(params, deltas)
    return value, g, [-b for b in d[1:]], -d[0]


def _close(a, b, tol, scale):
    """max |a − b| ≤ tol · max(max |b|, scale): a result that is small after cancellation
    (B(0) of a saturated first stage, say) is measured against the scale of the whole
    computation, as its rounding error is."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    err = max(float(jnp.max(jnp.abs(x.astype(jnp.float64) - y))) for x, y in zip(la, lb))
    return err <= tol * max(_largest(b), scale)


def _largest(tree):
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------ properties


@pytest.mark.standard_promotion  # the test's costs mix float32 states with float64 targets
@given(systems())
def test_costate_gradient_and_kkt_against_plain_forward(spec):
    system, x0 = build(spec)
    cost, decay = library_cost(spec), _decay(spec)
    tol = TOL[spec["dtype"]]
    value, g_ref, b_ref, b0_ref = reference(spec, system, x0)
    scale = max(_largest(g_ref), _largest(b_ref), _largest(b0_ref))

    # the costate recursion: C, dC/dW, B(1..N) and B(0) = −dC/dX(0)
    rec = aj.costates(system, x0, cost, control_cost=decay)
    assert abs(float(rec.value) - float(value)) <= tol * max(1.0, abs(float(value)))
    assert _close(rec.grads, g_ref, tol, scale)
    assert _close(rec.initial_costate, b0_ref, tol, scale)
    sizes = spec["sizes"]
    b = [rec.costates[k - 1][..., : sizes[k]] for k in range(1, len(sizes))]
    assert _close(b, b_ref, tol, scale)
    for leaf in jax.tree.leaves(rec.grads):  # each gradient in its control's dtype
        assert leaf.dtype == spec["dtype"]

    # jax.grad through the custom VJP of Multistage.trajectory
    def loss(s):
        c = cost(s.trajectory(x0))
        return c if decay is None else c + decay(s)

    assert _close(eqx.filter_grad(loss)(system), g_ref, tol, scale)

    # the Lagrangian's conditions at the recursion's states and costates
    kkt = aj.kkt_residuals(system, x0, rec.states, rec.costates, cost, control_cost=decay)
    assert float(jnp.max(kkt.forward_norms)) <= tol  # ∂L/∂B = X(k) − f_k(X(k−1))
    assert float(jnp.max(kkt.backward_norms)) <= tol * max(1.0, scale)  # ∂L/∂X
    assert _close(kkt.optimality, g_ref, tol, scale)  # ∂L/∂W = dC/dW
    assert kkt.forward_norms.shape == kkt.backward_norms.shape == (system.n_stages,)


def test_profiles_are_bounded():
    """The CI profile is derandomised with a fixed, small number of examples."""
    ci = settings.get_profile("ci")
    assert ci.derandomize and ci.max_examples <= 15 and ci.deadline is None
    if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci":
        assert settings.default.max_examples == ci.max_examples
    else:
        pytest.skip("a non-default hypothesis profile is loaded")
