"""Time-unfolded recurrent networks on the core costate recursion.

H(t) = f(H(t-1), I(t); W), t = 1..T, is a multistage system whose stages share one
set of controls: the equality constraints W(1) = … = W(T) = W. `RecurrentNet` builds it
as a stacked `Multistage` over its cell, the inputs I(t) per-stage leaves and the
cell's weights shared (`Multistage(shared=...)`). Back-propagation through time is then
the core's costate recursion, the per-step control gradients summed in the scan carry
(the derivative with respect to a shared weight is the sum over its uses):

    λ(T) = ∂C/∂H(T),   λ(t-1) = ∂fᵀ/∂H(t-1) · λ(t) + ∂C/∂H(t-1),
    dC/dW = Σ_t ∂fᵀ/∂W · λ(t),   dC/dI(t) = ∂fᵀ/∂I(t) · λ(t),

with O(|W|) memory for dC/dW, not O(T |W|), and the core's `checkpoint_every`.
"""

import abc
import warnings
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._misc import _default_dtype, _inexact
from ._multistage import AbstractAdjoint, CostateAdjoint, Multistage
from ._stage import AbstractStage, _activation_name, apply_activation, output_costate


# --------------------------------------------------------------------------------------
# Recurrent cells
# --------------------------------------------------------------------------------------


class AbstractCell(eqx.Module):
    """A recurrent cell H(t) = f(H(t-1), I(t); W) on one pattern.

    Subclasses implement `__call__(h, x)`; they may override `costate` with an analytic
    adjoint (default: `jax.vjp` of the cell on the batch) and declare `hidden_size` and
    `input_size` so that `RecurrentNet` checks its inputs.
    """

    @abc.abstractmethod
    def __call__(self, h: Array, x: Array) -> Array:
        """H(t) = f(H(t-1), I(t))."""

    @property
    def hidden_size(self) -> int | None:
        return None

    @property
    def input_size(self) -> int | None:
        return None

    def costate(self, h_prev, x, h_next, b_next):
        """Backward step on a batch: returns (∂fᵀ/∂H(t-1)·B, ∂fᵀ/∂I(t)·B, ∂fᵀ/∂W·B),
        the last a cell-shaped pytree summed over patterns."""
        del h_next
        params, static = eqx.partition(self, eqx.is_inexact_array)
        _, vjp = jax.vjp(lambda p, h, i: jax.vmap(eqx.combine(p, static))(h, i), params, h_prev, x)
        ct, b_h, b_x = vjp(b_next)
        return b_h, b_x, ct


class ElmanCell(AbstractCell):
    """H(t) = F(W H(t-1) + V I(t) + b), the simple recurrent cell.

    Analytic adjoint: Y = F'(A) ⊙ B(t) (from the stored H(t)), B(t-1) = Wᵀ Y,
    B_I(t) = Vᵀ Y, ∂W = Σ_p Y H(t-1)ᵀ, ∂V = Σ_p Y I(t)ᵀ, ∂b = Σ_p Y.

    **Arguments:** `input_size`, `hidden_size`, `activation` (as `Dense`), `use_bias`,
    `dtype`, `key` (initialisation ±1/√hidden_size).
    """

    weight_hh: Float[Array, "n n"]
    weight_ih: Float[Array, "n m"]
    bias: Float[Array, " n"] | None
    activation: str | Callable = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        activation="tanh",
        *,
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        for name, size in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"ElmanCell: {name} must be a positive int, got {size!r}")
        dtype = _default_dtype(dtype)
        k1, k2, k3 = jax.random.split(key, 3)
        lim = 1 / hidden_size**0.5
        uni = lambda k, s: jax.random.uniform(k, s, dtype, minval=-lim, maxval=lim)  # noqa: E731
        self.weight_hh = uni(k1, (hidden_size, hidden_size))
        self.weight_ih = uni(k2, (hidden_size, input_size))
        self.bias = uni(k3, (hidden_size,)) if use_bias else None
        self.activation = _activation_name(activation)

    @property
    def hidden_size(self):
        return self.weight_hh.shape[-1]

    @property
    def input_size(self):
        return self.weight_ih.shape[-1]

    def _preactivation(self, h, x):
        # W_hh h + W_ih x + b in the hidden state's dtype (float16 weights on float32 states)
        dtype = h.dtype
        a = h @ self.weight_hh.T.astype(dtype) + x.astype(dtype) @ self.weight_ih.T.astype(dtype)
        return a if self.bias is None else a + self.bias.astype(dtype)

    def __call__(self, h, x):
        return apply_activation(self.activation, self._preactivation(h, x))

    def costate(self, h_prev, x, h_next, b_next):
        y = output_costate(self.activation, h_next, b_next, lambda: self._preactivation(h_prev, x))
        grads = [y.T @ h_prev, y.T @ x.astype(y.dtype)]
        paths = [lambda c: c.weight_hh, lambda c: c.weight_ih]
        if self.bias is not None:
            grads.append(y.sum(axis=0))
            paths.append(lambda c: c.bias)
        ct = eqx.tree_at(lambda c: tuple(p(c) for p in paths), _inexact(self), tuple(grads))
        return y @ self.weight_hh.astype(y.dtype), y @ self.weight_ih.astype(y.dtype), ct


# --------------------------------------------------------------------------------------
# The recurrent net as a stacked Multistage
# --------------------------------------------------------------------------------------


class CellStep(AbstractStage):
    """Time step t of a recurrent net as a stage on the whole batch: the state is
    H(t-1) of all P patterns, (P, n), and

        H(t) = f(H(t-1), I(t); W)   pattern by pattern,

    with `cell` the controls W (shared by every step in `RecurrentNet`) and `inputs`
    I(t), (P, m). Its adjoint is the cell's: (∂fᵀ/∂H(t-1)·B, ∂W, ∂I(t)) from
    `cell.costate`. The `Multistage` built by `RecurrentNet.multistage` stacks these
    steps (inputs with leading axis T) and runs them on one "pattern", the batch.
    """

    cell: "AbstractCell"
    inputs: Array

    def __call__(self, h: Array) -> Array:
        return jax.vmap(self.cell)(h, self.inputs)

    def costate(self, x_prev, x_next, b_next):
        # the Multistage's pattern axis has length 1: the batch is this stage's state
        b_h, b_x, ct = self.cell.costate(x_prev[0], self.inputs, x_next[0], b_next[0])
        return b_h[None], CellStep(_inexact(ct), b_x)


def _shared_cell(step: CellStep):
    return step.cell


class RecurrentNet(eqx.Module):
    """A time-unfolded recurrent network H(t) = f(H(t-1), I(t); W), t = 1..T, whose
    stages share the controls W of one `cell` (equality constraints W(t) = W).

    It is a stacked `Multistage` of `CellStep`s (see `multistage`): the inputs I(t) are
    per-stage leaves and the cell is shared, so gradients are the core's costate
    recursion with dC/dW = Σ_t ∂fᵀ/∂W·λ(t) summed in the scan carry.

    **Arguments:**

    - `cell`: an `AbstractCell` (e.g. `ElmanCell`).
    - `length`: optional T; inputs of another length raise.
    - `checkpoint_every`: None (store all T+1 states) or k: `__call__` stores only the
      states H(0), H(k), H(2k), … and recomputes each segment of k steps in the
      backward pass (memory ~ (T/k + k)·P·n instead of T·P·n; about one extra forward
      pass of time; k ≈ √T minimises memory). It applies to `__call__` (cost on
      H(T)); `trajectory` returns every state anyway, so it stores them.
    - `adjoint`: any `AbstractAdjoint` of the core (`CostateAdjoint()` by default,
      `AutodiffAdjoint()` for plain reverse mode through `lax.scan`).

    **Calling:** `net(h0, inputs)` returns H(T); `net.trajectory(h0, inputs)` returns
    H(0..T) with leading axis T+1, for a cost on any step. `inputs` is (T, m) for one
    pattern or (T, P, m) for P patterns; `h0` is (n,) (broadcast over patterns) or
    (P, n).
    """

    cell: "AbstractCell"
    adjoint: AbstractAdjoint
    length: int | None = eqx.field(static=True)
    checkpoint_every: int | None = eqx.field(static=True)

    def __init__(
        self,
        cell: "AbstractCell",
        *,
        length: int | None = None,
        checkpoint_every: int | None = None,
        adjoint: AbstractAdjoint = CostateAdjoint(),
    ):
        if not isinstance(cell, AbstractCell):
            raise TypeError(f"RecurrentNet: cell must be an AbstractCell, got {type(cell)}")
        if not isinstance(adjoint, AbstractAdjoint):
            raise TypeError(
                f"RecurrentNet: adjoint must be an AbstractAdjoint, got {type(adjoint).__name__}"
            )
        for name, v in (("length", length), ("checkpoint_every", checkpoint_every)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"RecurrentNet: {name} must be None or a positive int, got {v!r}")
        self.cell = cell
        self.adjoint = adjoint
        self.length = length
        self.checkpoint_every = checkpoint_every

    def _prepare(self, h0, inputs):
        """Check shapes; return h0 (P, n), inputs (T, P, m), and whether P was added."""
        inputs = jnp.asarray(inputs)
        h0 = jnp.asarray(h0)
        for name, a in (("inputs", inputs), ("h0", h0)):
            if not jnp.issubdtype(a.dtype, jnp.floating):
                raise TypeError(f"RecurrentNet: {name} must be floating, got dtype {a.dtype}")
        if inputs.ndim not in (2, 3):
            raise ValueError(
                f"RecurrentNet: inputs must be (T, m) or (T, P, m), got shape {inputs.shape}"
            )
        t = inputs.shape[0]
        if t < 1:
            raise ValueError(f"RecurrentNet: inputs has T = 0 steps (shape {inputs.shape})")
        if self.length is not None and t != self.length:
            raise ValueError(
                f"RecurrentNet: inputs has T = {t} steps (shape {inputs.shape}), but the "
                f"net was built with length = {self.length}"
            )
        n, m = self.cell.hidden_size, self.cell.input_size
        if m is not None and inputs.shape[-1] != m:
            raise ValueError(
                f"RecurrentNet: inputs has {inputs.shape[-1]} features per step (shape "
                f"{inputs.shape}), but the cell takes input_size = {m}"
            )
        if h0.ndim not in (1, 2) or (n is not None and h0.shape[-1] != n):
            raise ValueError(
                f"RecurrentNet: h0 must be (n,) or (P, n) with n = {n}, got shape {h0.shape}"
            )
        added = inputs.ndim == 2
        if added:
            if h0.ndim != 1:
                raise ValueError(
                    f"RecurrentNet: inputs {inputs.shape} has no pattern axis but h0 has "
                    f"shape {h0.shape}; pass inputs of shape (T, P, m)"
                )
            inputs = inputs[:, None]
        p = inputs.shape[1]
        if h0.ndim == 1:
            h0 = jnp.broadcast_to(h0, (p,) + h0.shape)
        elif h0.shape[0] != p:
            raise ValueError(
                f"RecurrentNet: h0 has {h0.shape[0]} patterns (shape {h0.shape}) but inputs "
                f"has {p} (shape {inputs.shape})"
            )
        out = jax.eval_shape(jax.vmap(self.cell), h0, inputs[0])
        if getattr(out, "shape", None) != h0.shape:
            raise ValueError(
                f"RecurrentNet: the cell maps H {h0.shape[1:]} to "
                f"{getattr(out, 'shape', out)} per pattern; it must keep the state's shape"
            )
        return h0, inputs, added

    def _system(self, inputs: Array) -> Multistage:
        return Multistage(
            CellStep(self.cell, inputs),
            shared=_shared_cell,
            checkpoint_every=self.checkpoint_every,
            adjoint=self.adjoint,
        )

    def multistage(self, h0: Array, inputs: Array) -> tuple[Multistage, Array]:
        """The net as a core `Multistage` and its X(0).

        The system is a stacked `CellStep` (inputs I(1..T) with leading axis T, the
        cell shared by every step); its one "pattern" is the whole batch, so
        X(0) = H(0)[None] has shape (1, P, n) and X(t) = H(t)[None]. `adjoint.costates`
        applies to it: its `grads.stages.cell` is dC/dW (summed over t) and
        `grads.stages.inputs` is dC/dI(1..T)."""
        h0b, xb, _ = self._prepare(h0, inputs)
        return self._system(xb), h0b[None]

    def trajectory(self, h0: Array, inputs: Array) -> Array:
        """H(0..T), leading axis T+1 (then the pattern axis if `inputs` has one)."""
        h0b, xb, added = self._prepare(h0, inputs)
        states = self._system(xb).trajectory(h0b[None])[:, 0]
        return states[:, 0] if added else states

    def __call__(self, h0: Array, inputs: Array) -> Array:
        """H(T), stored with checkpoints every `checkpoint_every` steps."""
        h0b, xb, added = self._prepare(h0, inputs)
        h = self._system(xb)(h0b[None])[0]
        return h[0] if added else h

    # ---------------------------------------------------------------- deprecated API

    def unfold(self, h0: Array, inputs: Array) -> tuple[Multistage, Array]:
        """Deprecated: use `multistage`, whose system shares the cell instead of
        copying it T times.

        The same network as a core `Multistage` (stacked layout, one `UnfoldedStep`
        per time step, the cell's controls copied T times) and its initial state
        Z(0) = [H(0), I(1..T)]."""
        _deprecated("RecurrentNet.unfold", "RecurrentNet.multistage")
        h0b, xb, added = self._prepare(h0, inputs)
        t, p, m = xb.shape
        n = h0b.shape[-1]
        params, static = eqx.partition(self.cell, eqx.is_array)
        copies = jtu.tree_map(lambda a: jnp.broadcast_to(a, (t,) + a.shape), params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            step = UnfoldedStep(eqx.combine(copies, static), jnp.arange(t), n, t, m)
        z0 = jnp.concatenate([h0b, jnp.moveaxis(xb, 0, 1).reshape(p, t * m)], axis=-1)
        return Multistage(step), (z0[0] if added else z0)

    def tied_gradient(self, unfolded_grads) -> "AbstractCell":
        """Deprecated: the system of `multistage` sums dC/dW = Σ_t dC/dW(t) itself.

        The gradient with respect to the shared controls, from the gradients of the
        unfolded system (`costates(...).grads` of `unfold`)."""
        _deprecated("RecurrentNet.tied_gradient", "RecurrentNet.multistage")
        return jtu.tree_map(lambda g: g.sum(axis=0), unfolded_grads.stages.cell)

    def unfolded_states(self, z: Array) -> Array:
        """Deprecated (with `unfold`): H from the unfolded states (or costates)
        Z = [H, I(1..T)]."""
        _deprecated("RecurrentNet.unfolded_states", "RecurrentNet.multistage")
        n = self.cell.hidden_size
        if n is None:
            raise ValueError("unfolded_states needs a cell that declares hidden_size")
        return z[..., :n]


def _deprecated(name: str, instead: str) -> None:
    warnings.warn(
        f"{name} is deprecated and will be removed in the next release; use {instead}",
        DeprecationWarning,
        stacklevel=3,
    )


class UnfoldedStep(AbstractStage):
    """Deprecated (built by the deprecated `RecurrentNet.unfold`): time step t of an
    unfolded recurrent net as a stage on Z = [H, I(1..T)]:
    Z(t) = [f(H(t-1), I(t); W(t)), I(1..T)]. Use `RecurrentNet.multistage`."""

    cell: AbstractCell
    step: Int[Array, "*stage"]
    hidden: int = eqx.field(static=True)
    length: int = eqx.field(static=True)
    features: int = eqx.field(static=True)

    def __check_init__(self):
        _deprecated("adjoint.UnfoldedStep", "RecurrentNet.multistage (CellStep)")

    @property
    def in_shape(self):
        return (self.hidden + self.length * self.features,)

    @property
    def out_shape(self):
        return self.in_shape

    def __call__(self, z):
        h, rest = z[: self.hidden], z[self.hidden :]
        x = rest.reshape(self.length, self.features)[self.step]
        return jnp.concatenate([self.cell(h, x), rest])
