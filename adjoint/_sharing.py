"""Parameter-space transforms W = W(U) and shared weights (§3.1 of LeCun, 1988).

A stage's weights may be functions W(k) = W(U, k) of r elementary variables U. The
gradient with respect to U follows from the optimality condition by the chain rule:

    ∂L/∂u_q = Σ_{i,j} (Σ_p Y_p,i(k) X_p,j(k-1)) ∂w_ij(k)/∂u_q,

so a transformed stage computes the matrix Σ_p Y_p X_p(k-1)ᵀ *once* (one matrix
product over the pattern axis, exactly as `Dense` does) and pulls it back through the
map U ↦ W with the transpose of its Jacobian.

Shared weights are the special case W[i, j] = u[index[i, j]]: the equality
constraints w_ij = u_q. The pull-back is a scatter-add (a `segment_sum`): the derivative
with respect to u_q is the sum of the derivatives with respect to the weights that share
it. The Lagrange multiplier of the constraint w_ij − u_q = 0 is the per-use
contribution M_ij = (Σ_p Y_p X_p(k-1)ᵀ)_ij; `tie_multipliers` returns them grouped
by u_q, so one can see which uses of a shared weight pull against each other.

Two ways to build a convolution, with the same outputs and gradients as
`jax.lax.conv_general_dilated`:

- `SharedDense(conv_index(...))`: the tied dense matrix W(U) of size
  (C'·H'·W') × (C·H·W) is materialised. Use it for small inputs, for any tie pattern
  that is not a convolution, and to inspect tie multipliers.
- `Conv`: the structured fast path. The forward pass is `lax.conv_general_dilated` on
  image-shaped states, the costate step uses the transposed convolutions, and the dense
  matrix never exists (memory O(kernel), FLOPs O(kernel · image)). Use it for images.
  `Conv.to_shared_dense()` converts it to the first form.
"""

import abc
from collections.abc import Callable, Sequence
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from equinox import AbstractVar
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ._misc import _default_dtype
from ._stage import AbstractStage, _activation_name, apply_activation, output_costate


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


# --------------------------------------------------------------------------------------
# Transformed dense stages: X(k) = F(W(U) X(k-1) + b)
# --------------------------------------------------------------------------------------


class AbstractTransformedDense(AbstractStage):
    """A dense stage whose weights are a differentiable function of its controls U:

        X_p(k) = F(W(U) X_p(k-1) + b(U)).

    Its analytic adjoint, for a batch of patterns p:

        Y_p        = F'(A_p(k)) ⊙ B_p(k)
        B_p(k-1)   = W(U)ᵀ Y_p
        ∂W         = Σ_p Y_p X_p(k-1)ᵀ,   ∂b = Σ_p Y_p        (once, summed over patterns)
        ∂U         = (∂W/∂U)ᵀ ∂W + (∂b/∂U)ᵀ ∂b                 (`pullback`)

    Subclasses define `weight()` (W(U)), `bias_vector()` (b or None) and may override
    `pullback` (default: `jax.vjp` of U ↦ (W, b)).
    """

    activation: AbstractVar[str | Callable]

    @abc.abstractmethod
    def weight(self) -> Float[Array, "out in"]:
        """W(U), the weight matrix as a function of the controls."""

    @abc.abstractmethod
    def bias_vector(self) -> Float[Array, " out"] | None:
        """b(U), or None."""

    def pullback(self, d_weight: Array, d_bias: Array | None) -> "AbstractTransformedDense":
        """(∂W/∂U)ᵀ d_weight + (∂b/∂U)ᵀ d_bias, as a stage-shaped pytree."""
        params, static = eqx.partition(self, eqx.is_inexact_array)

        def maps(p):
            s = eqx.combine(p, static)
            return s.weight(), s.bias_vector()

        _, vjp = jax.vjp(maps, params)
        (ct,) = vjp((d_weight, d_bias))
        return ct

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(jax.eval_shape(self.weight).shape[-1:])

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(jax.eval_shape(self.weight).shape[-2:-1])

    def _preactivation(self, x: Array) -> Array:
        a = x @ self.weight().T
        bias = self.bias_vector()
        return a if bias is None else a + bias

    def __call__(self, x: Float[Array, " in"]) -> Float[Array, " out"]:
        return apply_activation(self.activation, self._preactivation(x))

    def costate(self, x_prev, x_next, b_next):
        y = output_costate(self.activation, x_next, b_next, lambda: self._preactivation(x_prev))
        b_prev = y @ self.weight()
        d_weight = y.T @ x_prev  # Σ_p Y_p X_p(k-1)ᵀ: one matrix product, never per pattern
        d_bias = None if self.bias_vector() is None else y.sum(axis=0)
        return b_prev, self.pullback(d_weight, d_bias)


class Transformed(AbstractTransformedDense):
    """A dense stage with weights W = transform(U) for any differentiable user map:

        X(k) = F(transform(U) X(k-1) + b).

    The costate step forms Σ_p Y_p X_p(k-1)ᵀ once and pulls it back through
    `transform` with `jax.vjp` (see `AbstractTransformedDense`).

    **Arguments:**

    - `transform`: a function U ↦ W returning an (out, in) floating matrix; it is a
      static part of the stage (use a named function or `functools.partial`, so that two
      equal stages compare equal under `jit`).
    - `controls`: U, any pytree of floating arrays.
    - `bias`: b, an (out,) array, or None.
    - `activation`: as `Dense`.
    """

    controls: PyTree[Array]
    bias: Float[Array, " out"] | None
    transform: Callable = eqx.field(static=True)
    activation: str | Callable = eqx.field(static=True)

    def __init__(self, transform: Callable, controls, bias=None, activation="tanh"):
        if not callable(transform):
            raise TypeError(f"Transformed: transform must be callable, got {type(transform)}")
        self.transform = transform
        self.controls = controls
        self.activation = _activation_name(activation)
        try:
            out = jax.eval_shape(transform, controls)
        except Exception as err:
            raise ValueError(
                f"Transformed: transform failed on the controls: {type(err).__name__}: {err}"
            ) from None
        if (
            not isinstance(out, jax.ShapeDtypeStruct)
            or out.ndim != 2
            or not jnp.issubdtype(out.dtype, jnp.floating)
        ):
            raise ValueError(
                "Transformed: transform(controls) must return one floating (out, in) "
                f"matrix W, got {getattr(out, 'shape', out)} "
                f"{getattr(out, 'dtype', '')}"
            )
        if bias is not None:
            bias = jnp.asarray(bias)
            if bias.shape != out.shape[:1]:
                raise ValueError(
                    f"Transformed: bias has shape {bias.shape}, but W(U) has shape "
                    f"{out.shape}; expected ({out.shape[0]},)"
                )
        self.bias = bias

    def weight(self):
        return self.transform(self.controls)

    def bias_vector(self):
        return self.bias


def _check_index(name: str, index, size: int, shape: tuple[int, ...] | None, owner: str):
    """Validate an integer index array with entries in [−1, size) (−1 = fixed zero).

    A concrete entry out of range is a ValueError naming the map and the value; traced
    indices (a stage built under `jit`) are checked with `eqx.error_if` when used, since
    an out-of-range gather would otherwise be clamped and read a wrong control silently.
    """
    if not hasattr(index, "dtype"):
        index = np.asarray(index)
    if not jnp.issubdtype(index.dtype, jnp.integer):
        raise TypeError(f"{owner}: {name} must have an integer dtype, got {index.dtype}")
    if shape is not None and tuple(index.shape) != shape:
        raise ValueError(f"{owner}: {name} has shape {tuple(index.shape)}, expected {shape}")
    allowed = f"entries in [-1, {size - 1}] (−1 = fixed zero)"
    if _is_concrete(index):
        host = np.asarray(index)
        bad = (host < -1) | (host >= size)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{owner}: {name} has entries in [{int(host.min())}, {int(host.max())}], but "
                f"it must index into an array of {size} controls: {allowed}; entry "
                f"{int(host[at])} at {at} is out of range"
            )
        return jnp.asarray(host, dtype=jnp.int32)
    index = jnp.asarray(index, dtype=jnp.int32)
    return eqx.error_if(
        index,
        (index < -1) | (index >= size),
        f"{owner}: {name} has an entry out of range: it must index into an array of "
        f"{size} controls, {allowed}",
    )


class SharedDense(AbstractTransformedDense):
    """A dense stage with shared (tied) weights, W[i, j] = u[index[i, j]]:

        X(k) = F(W(u) X(k-1) + b),   b[i] = bias[bias_index[i]] (or b = bias).

    `index[i, j] = −1` is a fixed zero connection (a local receptive field). Each tie
    w_ij = u_q is an equality constraint; the costate step computes
    ∂W = Σ_p Y_p X_p(k-1)ᵀ once and scatter-adds it into u:

        ∂u_q = Σ_{(i,j): index[i,j] = q} ∂W_ij

    (the derivative with respect to a shared weight is the sum over its uses).

    **Arguments:**

    - `index`: an (out, in) integer array with entries in [−1, len(u)).
    - `u`: the free parameters, a 1-D floating array.
    - `bias`: None, an (out,) array, or (with `bias_index`) a 1-D array of shared biases.
    - `bias_index`: None, or an (out,) integer array with entries in [−1, len(bias))
      (−1 = a fixed zero bias; for convolutions, the output channel of each unit).
    - `activation`: as `Dense`.

    `SharedDense.random(index_map, key=...)` initialises from an `IndexMap` (see
    `conv_index`, `tie_index`, `symmetric_index`).
    """

    index: Int[Array, "out in"]
    u: Float[Array, " q"]
    bias: Float[Array, " r"] | None
    bias_index: Int[Array, " out"] | None
    activation: str | Callable = eqx.field(static=True)

    def __init__(self, index, u, bias=None, *, bias_index=None, activation="tanh"):
        u = jnp.asarray(u)
        if u.ndim != 1 or not jnp.issubdtype(u.dtype, jnp.floating):
            raise ValueError(
                f"SharedDense: u must be a 1-D floating array, got shape {u.shape} "
                f"and dtype {u.dtype}"
            )
        index_ndim = np.ndim(index)
        if index_ndim != 2:
            raise ValueError(
                f"SharedDense: index must be an (out, in) matrix, got shape {np.shape(index)}"
            )
        self.index = _check_index("index", index, u.shape[0], None, "SharedDense")
        self.u = u
        out = self.index.shape[0]
        if bias is None:
            if bias_index is not None:
                raise ValueError("SharedDense: bias_index given without bias")
            self.bias, self.bias_index = None, None
        else:
            bias = jnp.asarray(bias, dtype=u.dtype)
            if bias.ndim != 1:
                raise ValueError(f"SharedDense: bias must be 1-D, got shape {bias.shape}")
            if bias_index is None:
                if bias.shape != (out,):
                    raise ValueError(
                        f"SharedDense: bias has shape {bias.shape}, but index has {out} "
                        f"rows; expected ({out},) (or pass bias_index to share biases)"
                    )
                self.bias_index = None
            else:
                self.bias_index = _check_index(
                    "bias_index", bias_index, bias.shape[0], (out,), "SharedDense"
                )
            self.bias = bias
        self.activation = _activation_name(activation)

    @classmethod
    def random(
        cls,
        index_map: "IndexMap | Array",
        num_controls: int | None = None,
        *,
        activation="tanh",
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray,
    ) -> "SharedDense":
        """Initialise u (and the biases) uniformly in ±1/√fan_in, where fan_in is the
        largest number of connections into one unit. `index_map` is an `IndexMap` or an
        index matrix (then `num_controls` defaults to max(index) + 1)."""
        dtype = _default_dtype(dtype)
        if isinstance(index_map, IndexMap):
            index, q = index_map.weight_index, index_map.num_weights
            bias_index, r = index_map.bias_index, index_map.num_biases
        else:
            index = np.asarray(index_map)
            q = int(index.max()) + 1 if num_controls is None else num_controls
            bias_index, r = None, index.shape[0]
        fan_in = max(int(np.max(np.sum(np.asarray(index) >= 0, axis=1))), 1)
        lim = 1 / fan_in**0.5
        ukey, bkey = jax.random.split(key)
        u = jax.random.uniform(ukey, (q,), dtype, minval=-lim, maxval=lim)
        bias = jax.random.uniform(bkey, (r,), dtype, minval=-lim, maxval=lim) if use_bias else None
        return cls(
            index, u, bias, bias_index=bias_index if use_bias else None, activation=activation
        )

    @property
    def in_shape(self):
        return self.index.shape[-1:]

    @property
    def out_shape(self):
        return self.index.shape[-2:-1]

    def weight(self):
        # index −1 picks the appended zero: a fixed zero connection.
        u_ext = jnp.concatenate([self.u, jnp.zeros((1,), self.u.dtype)])
        return u_ext[self.index]

    def bias_vector(self):
        if self.bias is None or self.bias_index is None:
            return self.bias
        # bias_index −1 picks the appended zero: a fixed zero bias, as for weights.
        bias_ext = jnp.concatenate([self.bias, jnp.zeros((1,), self.bias.dtype)])
        return bias_ext[self.bias_index]

    def pullback(self, d_weight, d_bias):
        # ∂u_q = Σ_{index[i,j] = q} ∂W_ij: a scatter-add; index −1 is dropped.
        d_u = jax.ops.segment_sum(
            d_weight.reshape(-1), self.index.reshape(-1), num_segments=self.u.shape[0]
        )
        if d_bias is not None and self.bias_index is not None:
            d_bias = jax.ops.segment_sum(d_bias, self.bias_index, num_segments=self.bias.shape[0])
        ct = eqx.filter(self, eqx.is_inexact_array)
        if d_bias is None:
            return eqx.tree_at(lambda s: s.u, ct, d_u)
        return eqx.tree_at(lambda s: (s.u, s.bias), ct, (d_u, d_bias))

    @property
    def num_controls(self) -> int:
        """The number of free parameters (shared weights and biases)."""
        return self.u.shape[0] + (0 if self.bias is None else self.bias.shape[0])


# --------------------------------------------------------------------------------------
# Tie multipliers: the Lagrange multipliers of w_ij = u_q
# --------------------------------------------------------------------------------------


class TieMultipliers(eqx.Module):
    """The Lagrange multipliers of the equality constraints w_ij − u_q = 0.

    Adding Σ M_ij (w_ij − u_index[i,j]) to the Lagrangian and asking ∂L/∂w_ij = 0
    gives, in the paper's sign (fed B(k) = −∂C/∂X(k)),

        M_ij = (Σ_p Y_p X_p(k-1)ᵀ)_ij = −∂C/∂w_ij,

    the contribution of one *use* of a shared weight; ∂L/∂u_q = −Σ_{ij∈q} M_ij. Fed the
    cotangent λ = ∂C/∂X instead, every field changes sign.

    - `multipliers`: M, shaped like W, zero on fixed-zero connections (index −1).
    - `count`: uses of each u_q.
    - `total`: Σ_{ij∈q} M_ij (= −dC/du_q in the paper's sign).
    - `mean`, `spread` (standard deviation), `smallest`, `largest`: over the uses of u_q.
    - `coherence`: |Σ M| / Σ |M| ∈ [0, 1] per u_q: 1 when all uses pull the same way,
      near 0 when they pull against each other (NaN-free: 1 for unused or all-zero groups).
    """

    multipliers: Array
    count: Array
    total: Array
    mean: Array
    spread: Array
    smallest: Array
    largest: Array
    coherence: Array


def tie_multipliers(stage: SharedDense, x_prev: Array, x_next: Array, b_next: Array):
    """The tie multipliers M_ij = Σ_p (F'(A_p) ⊙ B_p)_i X_p,j(k-1) of a `SharedDense`
    stage, grouped by shared weight (see `TieMultipliers`).

    **Arguments:** `x_prev` X(k-1), `x_next` X(k), `b_next` B(k): one pattern or a batch
    with a leading pattern axis (for example `record.states[k-1]`, `record.states[k]`,
    `record.costates[k-1]` from `adjoint.costates`). A `Conv` stage can be inspected
    through `conv.to_shared_dense()` on flattened states.
    """
    if not isinstance(stage, SharedDense):
        raise TypeError(f"tie_multipliers needs a SharedDense stage, got {type(stage).__name__}")
    x_prev, x_next, b_next = (jnp.asarray(a) for a in (x_prev, x_next, b_next))
    if x_prev.ndim == 1:
        x_prev, x_next, b_next = x_prev[None], x_next[None], b_next[None]
    (n_in,), (n_out,) = stage.in_shape, stage.out_shape
    if x_prev.shape[1:] != (n_in,) or x_next.shape[1:] != (n_out,) or b_next.shape != x_next.shape:
        raise ValueError(
            f"tie_multipliers: expected X(k-1) (P, {n_in}), X(k) and B(k) (P, {n_out}); got "
            f"{x_prev.shape}, {x_next.shape}, {b_next.shape}"
        )
    y = output_costate(
        stage.activation, x_next, b_next, lambda: jax.vmap(stage._preactivation)(x_prev)
    )
    used = stage.index >= 0
    m = jnp.where(used, y.T @ x_prev, 0)
    ids = stage.index.reshape(-1)
    flat = m.reshape(-1)
    q = stage.u.shape[0]
    count = jax.ops.segment_sum(used.reshape(-1).astype(m.dtype), ids, num_segments=q)
    total = jax.ops.segment_sum(flat, ids, num_segments=q)
    safe = jnp.maximum(count, 1)
    mean = total / safe
    var = jax.ops.segment_sum(flat * flat, ids, num_segments=q) / safe - mean * mean
    spread = jnp.sqrt(jnp.maximum(var, 0))
    has = count > 0
    smallest = jnp.where(has, jax.ops.segment_min(flat, ids, num_segments=q), 0)
    largest = jnp.where(has, jax.ops.segment_max(flat, ids, num_segments=q), 0)
    absolute = jax.ops.segment_sum(jnp.abs(flat), ids, num_segments=q)
    coherence = jnp.where(absolute > 0, jnp.abs(total) / jnp.where(absolute > 0, absolute, 1), 1)
    return TieMultipliers(m, count, total, mean, spread, smallest, largest, coherence)


# --------------------------------------------------------------------------------------
# Index maps: convolutions and user tie patterns
# --------------------------------------------------------------------------------------


class IndexMap(NamedTuple):
    """A tie pattern for `SharedDense`: W[i, j] = u[weight_index[i, j]] (−1 = zero) and
    b[i] = bias[bias_index[i]]. States are flattened row-major from `in_shape` and
    `out_shape` (channels first, as `lax.conv_general_dilated`'s default layout)."""

    weight_index: np.ndarray
    num_weights: int
    bias_index: np.ndarray | None
    num_biases: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


def _tuple(name: str, value, n: int) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value),) * n
    value = tuple(value)
    if len(value) != n or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in value
    ):
        raise ValueError(f"{name} must be a positive int or {n} positive ints, got {value!r}")
    return tuple(int(v) for v in value)


def _conv_geometry(in_shape, kernel_size, stride, padding, dilation, owner: str):
    """Normalise the convolution arguments; return (spatial, kernel, stride, pads,
    dilation, out_spatial), raising if the kernel does not fit."""
    in_shape = tuple(in_shape)
    if len(in_shape) < 2 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in in_shape):
        raise ValueError(
            f"{owner}: in_shape must be (channels, *spatial) with positive ints, got {in_shape}"
        )
    spatial = tuple(int(s) for s in in_shape[1:])
    n = len(spatial)
    kernel = _tuple(f"{owner}: kernel_size", kernel_size, n)
    stride = _tuple(f"{owner}: stride", stride, n)
    dilation = _tuple(f"{owner}: dilation", dilation, n)
    dilated = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"{owner}: padding must be 'SAME', 'VALID', ints or pairs")
        pads = tuple(jax.lax.padtype_to_pads(spatial, dilated, stride, padding.upper()))
    elif isinstance(padding, (int, np.integer)):
        pads = ((int(padding), int(padding)),) * n
    else:
        padding = tuple(padding)
        if len(padding) != n:
            raise ValueError(f"{owner}: padding needs {n} entries, got {padding!r}")
        pads = tuple((int(p), int(p)) if np.ndim(p) == 0 else tuple(map(int, p)) for p in padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        raise ValueError(f"{owner}: padding must be non-negative, got {pads}")
    out = tuple(
        (s + lo + hi - dk) // st + 1 if s + lo + hi >= dk else 0
        for s, (lo, hi), dk, st in zip(spatial, pads, dilated, stride)
    )
    if any(o < 1 for o in out):
        raise ValueError(
            f"{owner}: a kernel of size {kernel} (dilated {dilated}) does not fit an input "
            f"of spatial shape {spatial} with padding {pads}"
        )
    return spatial, kernel, stride, pads, dilation, out


def conv_index(
    in_shape: Sequence[int],
    out_channels: int,
    kernel_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: str | int | Sequence = 0,
    dilation: int | Sequence[int] = 1,
) -> IndexMap:
    """The tie pattern of a convolution (1-D, 2-D or n-D) as an `IndexMap`.

    With states X(k-1) of shape (C, *spatial) and X(k) of shape (C', *spatial') flattened
    row-major, and u = kernel.ravel() for a kernel of shape (C', C, *kernel_size):

        W[(c', o), (c, o·stride + κ·dilation − pad_lo)] = u[(c', c, κ)],

    entries that fall in the padding being fixed zeros (−1); the bias is shared over
    each output channel (bias_index[(c', o)] = c'). `SharedDense` with this map computes
    `lax.conv_general_dilated(x, kernel, stride, padding, rhs_dilation=dilation)`
    (cross-correlation, as in that function).

    **Arguments:** `in_shape` (C, *spatial); `out_channels` C'; `kernel_size`, `stride`,
    `dilation` (an int or one per spatial axis); `padding` ('VALID', 'SAME', an int, or
    one int or (lo, hi) pair per spatial axis).
    """
    spatial, kernel, stride, pads, dilation, out = _conv_geometry(
        in_shape, kernel_size, stride, padding, dilation, "conv_index"
    )
    if not isinstance(out_channels, (int, np.integer)) or out_channels < 1:
        raise ValueError(f"conv_index: out_channels must be a positive int, got {out_channels!r}")
    c_in, c_out, n = int(in_shape[0]), int(out_channels), len(spatial)
    # One entry per (c', o, c, κ): broadcast grids, row-major as the flattened states.
    grids = np.meshgrid(
        np.arange(c_out),
        *[np.arange(o) for o in out],
        np.arange(c_in),
        *[np.arange(k) for k in kernel],
        indexing="ij",
    )
    co, os_, ci, ks = grids[0], grids[1 : 1 + n], grids[1 + n], grids[2 + n :]
    pos = [o * st + k * d - lo for o, k, st, d, (lo, _) in zip(os_, ks, stride, dilation, pads)]
    inside = np.ones(co.shape, bool)
    for p, s in zip(pos, spatial):
        inside &= (p >= 0) & (p < s)
    rows = np.ravel_multi_index((co, *os_), (c_out, *out))
    cols = np.ravel_multi_index(
        (ci, *[np.clip(p, 0, s - 1) for p, s in zip(pos, spatial)]), (c_in, *spatial)
    )
    q = np.ravel_multi_index((co, ci, *ks), (c_out, c_in, *kernel))
    index = np.full((c_out * int(np.prod(out)), c_in * int(np.prod(spatial))), -1, np.int32)
    index[rows[inside], cols[inside]] = q[inside]
    bias_index = np.repeat(np.arange(c_out, dtype=np.int32), int(np.prod(out)))
    return IndexMap(
        index,
        c_out * c_in * int(np.prod(kernel)),
        bias_index,
        c_out,
        (c_in, *spatial),
        (c_out, *out),
    )


def tie_index(groups) -> IndexMap:
    """A user's own tie pattern: `groups[i, j]` is any integer label (weights with equal
    labels share one u; −1 = fixed zero). Labels are renumbered 0..q−1 in increasing
    order; biases are untied."""
    groups = np.asarray(groups)
    if groups.ndim != 2:
        raise ValueError(f"tie_index: groups must be an (out, in) matrix, got {groups.shape}")
    if not np.issubdtype(groups.dtype, np.integer):
        raise TypeError(f"tie_index: groups must have an integer dtype, got {groups.dtype}")
    if groups.size and groups.min() < -1:
        raise ValueError(f"tie_index: labels must be ≥ −1 (−1 = fixed zero), got {groups.min()}")
    labels, inverse = np.unique(groups[groups >= 0], return_inverse=True)
    index = np.full(groups.shape, -1, np.int32)
    index[groups >= 0] = inverse
    out, n_in = groups.shape
    return IndexMap(index, len(labels), None, out, (n_in,), (out,))


def symmetric_index(n: int) -> IndexMap:
    """Ties for a symmetric n × n matrix: W[i, j] = W[j, i] = u[q(min, max)],
    q running over the upper triangle (n(n+1)/2 free parameters)."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"symmetric_index: n must be a positive int, got {n!r}")
    i, j = np.triu_indices(n)
    groups = np.zeros((n, n), np.int64)
    groups[i, j] = np.arange(len(i))
    groups[j, i] = np.arange(len(i))
    return tie_index(groups)


# --------------------------------------------------------------------------------------
# The structured fast path: convolution on image-shaped states
# --------------------------------------------------------------------------------------


class Conv(AbstractStage):
    """A convolutional stage on image-shaped states (the structured form of
    `SharedDense(conv_index(...))`):

        A_p(k) = K ⋆ X_p(k-1) + b,   X_p(k) = F(A_p(k)),

    with ⋆ = `lax.conv_general_dilated` (channels first: X of shape (C, *spatial), K of
    shape (C', C, *kernel_size), b per output channel). The costate step never forms
    the tied dense matrix:

        Y_p      = F'(A_p) ⊙ B_p(k)
        B_p(k-1) = K ⋆ᵀ Y_p                 (the transposed convolution)
        ∂K       = Σ_p Y_p ⋆ X_p(k-1)       (one batched correlation, summed over p)
        ∂b_c'    = Σ_p Σ_o Y_p,c',o

    the transposes being `jax.linear_transpose` of the (linear) convolution. Use this for
    images; `to_shared_dense()` gives the equivalent tied dense stage.

    **Arguments:** `in_shape` (C, *spatial); `out_channels`; `kernel_size`; `stride`,
    `padding`, `dilation` as `conv_index`; `activation`, `use_bias`, `dtype`, `key` as
    `Dense` (initialisation ±1/√(C·prod(kernel_size))).
    """

    kernel: Float[Array, "out_c in_c *kernel"]
    bias: Float[Array, " out_c"] | None
    input_shape: tuple[int, ...] = eqx.field(static=True)
    output_shape: tuple[int, ...] = eqx.field(static=True)
    stride: tuple[int, ...] = eqx.field(static=True)
    padding: tuple[tuple[int, int], ...] = eqx.field(static=True)
    dilation: tuple[int, ...] = eqx.field(static=True)
    activation: str | Callable = eqx.field(static=True)

    def __init__(
        self,
        in_shape: Sequence[int],
        out_channels: int,
        kernel_size: int | Sequence[int],
        *,
        stride=1,
        padding="VALID",
        dilation=1,
        activation="tanh",
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        spatial, kernel, stride, pads, dilation, out = _conv_geometry(
            in_shape, kernel_size, stride, padding, dilation, "Conv"
        )
        if not isinstance(out_channels, (int, np.integer)) or out_channels < 1:
            raise ValueError(f"Conv: out_channels must be a positive int, got {out_channels!r}")
        dtype = _default_dtype(dtype)
        c_in = int(in_shape[0])
        lim = 1 / (c_in * int(np.prod(kernel))) ** 0.5
        kkey, bkey = jax.random.split(key)
        self.kernel = jax.random.uniform(
            kkey, (int(out_channels), c_in, *kernel), dtype, minval=-lim, maxval=lim
        )
        self.bias = (
            jax.random.uniform(bkey, (int(out_channels),), dtype, minval=-lim, maxval=lim)
            if use_bias
            else None
        )
        self.input_shape = (c_in, *spatial)
        self.output_shape = (int(out_channels), *out)
        self.stride, self.padding, self.dilation = stride, pads, dilation
        self.activation = _activation_name(activation)

    @property
    def in_shape(self):
        return self.input_shape

    @property
    def out_shape(self):
        return self.output_shape

    def _convolve(self, x: Array, kernel: Array) -> Array:
        """K ⋆ X on a batch (P, C, *spatial)."""
        return jax.lax.conv_general_dilated(
            x, kernel, self.stride, self.padding, rhs_dilation=self.dilation
        )

    def _preactivation(self, x: Array) -> Array:
        a = self._convolve(x, self.kernel)
        if self.bias is None:
            return a
        return a + self.bias.reshape((-1,) + (1,) * (a.ndim - 2))

    def __call__(self, x: Float[Array, " c *spatial"]) -> Array:
        if x.shape != self.in_shape:
            raise ValueError(f"Conv: state has shape {x.shape}, expected {self.in_shape}")
        return apply_activation(self.activation, self._preactivation(x[None])[0])

    def costate(self, x_prev, x_next, b_next):
        y = output_costate(self.activation, x_next, b_next, lambda: self._preactivation(x_prev))
        (b_prev,) = jax.linear_transpose(lambda x: self._convolve(x, self.kernel), x_prev)(y)
        (d_kernel,) = jax.linear_transpose(lambda k: self._convolve(x_prev, k), self.kernel)(y)
        ct = eqx.filter(self, eqx.is_inexact_array)
        if self.bias is None:
            return b_prev, eqx.tree_at(lambda s: s.kernel, ct, d_kernel)
        d_bias = y.sum(axis=(0, *range(2, y.ndim)))
        return b_prev, eqx.tree_at(lambda s: (s.kernel, s.bias), ct, (d_kernel, d_bias))

    def index_map(self) -> IndexMap:
        """The tie pattern of this convolution on flattened states."""
        return conv_index(
            self.in_shape,
            self.kernel.shape[0],
            self.kernel.shape[2:],
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
        )

    def to_shared_dense(self) -> SharedDense:
        """The same stage as a `SharedDense` on flattened states (materialises the
        (C'·prod(out)) × (C·prod(in)) tied matrix)."""
        imap = self.index_map()
        return SharedDense(
            imap.weight_index,
            self.kernel.reshape(-1),
            self.bias,
            bias_index=None if self.bias is None else imap.bias_index,
            activation=self.activation,
        )


def count_controls(stage) -> int:
    """The number of free parameters (floating array entries) of a stage or system."""
    return sum(x.size for x in jtu.tree_leaves(eqx.filter(stage, eqx.is_inexact_array)))
