"""Skip connections, residual stages and time-unfolded recurrent networks.

The core `Multistage` chains X(k-1) → X(k). Two remarks of the paper (§3) are built on
it here:

- **Skip connections.** A stage that reads earlier states X(j), j < k − 1, becomes an
  ordinary stage of an *augmented* system whose state Z(k) carries, besides X(k), the
  earlier states that later stages still read. The core recursion then sums, for every
  state, the contributions of all the stages that read it (a carried copy's costate is
  added to the costate of the stage that reads it), and `costates`, `lagrangian` and
  `kkt_residuals` work unchanged. A residual stage X(k) = X(k-1) + g(X(k-1)) needs no
  augmentation: it is a stage with adjoint B(k-1) = B(k) + ∂gᵀ/∂X · B(k).
- **Time-unfolded recurrent networks.** H(t) = f(H(t-1), I(t); W), t = 1..T, is a
  multistage system whose stages share one set of controls: the equality constraints
  W(1) = … = W(T) = W. Back-propagation through time is the costate recursion with the
  per-step control gradients summed (the derivative with respect to a shared weight is
  the sum over its uses):

      λ(T) = ∂C/∂H(T),   λ(t-1) = ∂fᵀ/∂H(t-1) · λ(t) + ∂C/∂H(t-1),
      dC/dW = Σ_t ∂fᵀ/∂W · λ(t),   dC/dI(t) = ∂fᵀ/∂I(t) · λ(t).

  `RecurrentNet` runs it as a reversed `lax.scan` whose carry holds λ and the running
  sum of the control gradients (O(|W|) memory, not O(T |W|)); with `checkpoint_every=k`
  it stores only every k-th state and recomputes each segment in the backward pass.
  `RecurrentNet.unfold` builds the same network as a core `Multistage` (one stage per
  time step, the controls copied T times) for the Lagrangian tools.
"""

import abc
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._lagrangian import _is_none, _tree_add
from ._multistage import AbstractAdjoint, AutodiffAdjoint, CostateAdjoint, Multistage
from ._sharing import _default_dtype, _output_costate
from ._stage import AbstractStage, _activation_name, apply_activation


def _inexact(tree):
    return eqx.filter(tree, eqx.is_inexact_array)


def _stage_ct(module, path, ct):
    """`module` filtered to its inexact arrays, with the subtree at `path` set to `ct`."""
    return eqx.tree_at(path, _inexact(module), ct, is_leaf=_is_none)


# --------------------------------------------------------------------------------------
# Residual stages
# --------------------------------------------------------------------------------------


class Residual(AbstractStage):
    """A residual stage X(k) = X(k-1) + g(X(k-1)) around any stage g that maps a state
    to a state of the same shape.

    Adjoint (for a batch of patterns):

        B(k-1) = B(k) + ∂gᵀ/∂X(k-1) · B(k),    ∂W_g = g's own control part,

    using g's `costate` (analytic for `Dense`); g's output is recomputed from X(k-1) in
    the backward pass, so only the states are stored.
    """

    g: AbstractStage

    def __init__(self, g: AbstractStage):
        if not isinstance(g, AbstractStage):
            raise TypeError(f"Residual: g must be an adjoint.AbstractStage, got {type(g)}")
        if g.in_shape is not None and g.out_shape is not None and g.in_shape != g.out_shape:
            raise ValueError(
                f"Residual: g must map a state to a state of the same shape; "
                f"{type(g).__name__} maps {g.in_shape} to {g.out_shape}"
            )
        self.g = g

    @property
    def in_shape(self):
        return self.g.in_shape

    @property
    def out_shape(self):
        return self.g.in_shape

    def __call__(self, x):
        return x + self.g(x)

    def costate(self, x_prev, x_next, b_next):
        del x_next
        g_next = jax.vmap(self.g)(x_prev)
        b_g, ct = self.g.costate(x_prev, g_next, b_next)
        return b_next + b_g, _stage_ct(self, lambda s: s.g, ct)


# --------------------------------------------------------------------------------------
# Skip connections on an augmented state
# --------------------------------------------------------------------------------------


def _split(z: Array, blocks) -> dict[int, Array]:
    out, start = {}, 0
    for j, size in blocks:
        out[j] = z[..., start : start + size]
        start += size
    return out


class Skip(AbstractStage):
    """Stage k of a network with skip connections, written on the augmented state Z.

    Z(k-1) is the concatenation of the blocks `blocks_in` = ((j, size_j), ...), the
    states X(j) still needed. The stage computes

        X(k) = f_k(concat(X(j) for j in reads)),   Z(k) = concat(X(k), carried X(j)),

    the carried blocks being `blocks_out[1:]`. Its adjoint splits B(Z(k)) into blocks,
    runs f_k's own `costate` on B(X(k)), and returns for each block j of Z(k-1)

        B(X(j)) = B(carried copy of X(j)) + Σ_{reads of j} (∂f_kᵀ/∂X(j) · B(X(k))),

    i.e. a state's costate sums the contributions of every stage that reads it. Build
    these with `skip_network`.
    """

    stage: AbstractStage
    blocks_in: tuple[tuple[int, int], ...] = eqx.field(static=True)
    reads: tuple[int, ...] = eqx.field(static=True)
    blocks_out: tuple[tuple[int, int], ...] = eqx.field(static=True)

    @property
    def in_shape(self):
        return (sum(size for _, size in self.blocks_in),)

    @property
    def out_shape(self):
        return (sum(size for _, size in self.blocks_out),)

    def _read(self, parts):
        return jnp.concatenate([parts[j] for j in self.reads], axis=-1)

    def __call__(self, z):
        parts = _split(z, self.blocks_in)
        x = self.stage(self._read(parts))
        return jnp.concatenate([x] + [parts[j] for j, _ in self.blocks_out[1:]], axis=-1)

    def costate(self, x_prev, x_next, b_next):
        parts = _split(x_prev, self.blocks_in)
        k, size_k = self.blocks_out[0]
        b_parts = _split(b_next, self.blocks_out)
        b_read, ct = self.stage.costate(self._read(parts), x_next[..., :size_k], b_parts[k])
        sizes = dict(self.blocks_in)
        b_prev = {j: b_parts.get(j) for j, _ in self.blocks_in}
        start = 0
        for j in self.reads:
            piece = b_read[..., start : start + sizes[j]]
            b_prev[j] = piece if b_prev[j] is None else b_prev[j] + piece
            start += sizes[j]
        blocks = [
            b if b is not None else jnp.zeros(b_next.shape[:-1] + (sizes[j],), b_next.dtype)
            for j, b in b_prev.items()
        ]
        return jnp.concatenate(blocks, axis=-1), _stage_ct(self, lambda s: s.stage, ct)


def skip_network(
    stages: Sequence[AbstractStage],
    reads: Sequence[Sequence[int] | int] | None = None,
    *,
    in_size: int | None = None,
    dtype=None,
    **kwargs,
) -> Multistage:
    """A network with skip connections as a `Multistage` on augmented states.

    Stage k (1-based) computes X(k) = f_k(concat(X(j) for j in reads[k-1])) from any
    earlier states j ∈ 0..k-1 (default: reads[k-1] = (k-1,), a plain chain). States are
    vectors. The returned system's state Z(k) holds X(k) first, then the earlier states
    that later stages still read, so Z(N) = X(N); `skip_states` extracts X(k) (and the
    costates B(k)) from the augmented trajectory. `costates`, `lagrangian`,
    `kkt_residuals` and `check_gradients` apply to the returned system as to any other.

    **Arguments:** `stages` f_1..f_N; `reads`; `in_size`, the size of X(0) (inferred
    from stage 1 when it reads only X(0) and declares its `in_shape`); `dtype` of the
    shape check (default: the first stage's controls); other keywords go to
    `Multistage` (`adjoint`, `check_finite`).
    """
    stages = tuple(stages)
    if not stages:
        raise ValueError("skip_network needs at least one stage; got none")
    n = len(stages)
    for k, s in enumerate(stages, start=1):
        if not isinstance(s, AbstractStage):
            raise TypeError(f"skip_network: stage {k} must be an AbstractStage, got {type(s)}")
    if reads is None:
        reads = [(k - 1,) for k in range(1, n + 1)]
    reads = [tuple([r]) if isinstance(r, int) else tuple(r) for r in reads]
    if len(reads) != n:
        raise ValueError(f"skip_network: reads has {len(reads)} entries for {n} stages")
    for k, r in enumerate(reads, start=1):
        if not r or not all(isinstance(j, int) and 0 <= j < k for j in r):
            raise ValueError(
                f"skip_network: stage {k} reads {r}; it may read only states 0..{k - 1}"
            )
    if in_size is None:
        shape = stages[0].in_shape
        if reads[0] != (0,) or shape is None or len(shape) != 1:
            raise ValueError("skip_network: pass in_size, the size of X(0)")
        in_size = shape[0]
    if dtype is None:
        leaves = jtu.tree_leaves(_inexact(stages[0]))
        dtype = leaves[0].dtype if leaves else jnp.zeros(()).dtype
    sizes = [int(in_size)]
    for k, (s, r) in enumerate(zip(stages, reads), start=1):
        n_in = sum(sizes[j] for j in r)
        if s.in_shape is not None and tuple(s.in_shape) != (n_in,):
            raise ValueError(
                f"skip_network: stage {k} ({type(s).__name__}) expects shape {s.in_shape}, "
                f"but concat(X(j) for j in {r}) has shape ({n_in},)"
            )
        try:
            out = jax.eval_shape(s, jax.ShapeDtypeStruct((n_in,), dtype))
        except Exception as err:
            raise ValueError(
                f"skip_network: stage {k} ({type(s).__name__}) cannot take a state of shape "
                f"({n_in},): {type(err).__name__}: {err}"
            ) from None
        if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim != 1:
            raise ValueError(
                f"skip_network: stage {k} must return a vector, got {getattr(out, 'shape', out)}"
            )
        sizes.append(out.shape[0])
    last_use = {
        j: max((k for k, r in enumerate(reads, start=1) if j in r), default=-1)
        for j in range(n + 1)
    }
    blocks = [((0, sizes[0]),)]
    for k in range(1, n + 1):
        carried = tuple((j, sizes[j]) for j in range(k) if last_use[j] > k)
        blocks.append(((k, sizes[k]),) + carried)
    skips = [
        Skip(stage=s, blocks_in=blocks[k - 1], reads=reads[k - 1], blocks_out=blocks[k])
        for k, s in enumerate(stages, start=1)
    ]
    return Multistage(skips, **kwargs)


def skip_states(system: Multistage, tree: Sequence[Array]) -> tuple[Array, ...]:
    """X(0..N) from the augmented states Z(0..N) of a `skip_network` (N+1 entries), or
    the costates B(1..N) of the original states from the augmented costates (N
    entries): X(k) is the first block of Z(k), and its costate, the first block of
    B(Z(k)), is the total −dC/dX(k) (later uses reach X(k) through the carried copies)."""
    if system.stacked or not all(isinstance(s, Skip) for s in system.stages):
        raise TypeError("skip_states needs a Multistage built by skip_network")
    n = system.n_stages
    tree = tuple(tree)
    sizes = [s.blocks_out[0][1] for s in system.stages]
    if len(tree) == n + 1:
        return (tree[0],) + tuple(z[..., :m] for z, m in zip(tree[1:], sizes))
    if len(tree) == n:
        return tuple(z[..., :m] for z, m in zip(tree, sizes))
    raise ValueError(f"skip_states: expected {n + 1} states or {n} costates, got {len(tree)}")


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
        a = h @ self.weight_hh.T + x @ self.weight_ih.T
        return a if self.bias is None else a + self.bias

    def __call__(self, h, x):
        return apply_activation(self.activation, self._preactivation(h, x))

    def costate(self, h_prev, x, h_next, b_next):
        y = _output_costate(self.activation, h_next, b_next, lambda: self._preactivation(h_prev, x))
        grads = [y.T @ h_prev, y.T @ x]
        paths = [lambda c: c.weight_hh, lambda c: c.weight_ih]
        if self.bias is not None:
            grads.append(y.sum(axis=0))
            paths.append(lambda c: c.bias)
        ct = eqx.tree_at(lambda c: tuple(p(c) for p in paths), _inexact(self), tuple(grads))
        return y @ self.weight_hh, y @ self.weight_ih, ct


# --------------------------------------------------------------------------------------
# Back-propagation through time: the recursion with shared controls
# --------------------------------------------------------------------------------------


def _run_states(cell, h0, inputs):
    """H(0..L) from H(0) and I(1..L), on a batch."""

    def step(h, x):
        h = jax.vmap(cell)(h, x)
        return h, h

    _, hs = jax.lax.scan(step, h0, inputs)
    return jnp.concatenate([h0[None], hs])


def _run_final(cell, h0, inputs):
    return jax.lax.scan(lambda h, x: (jax.vmap(cell)(h, x), None), h0, inputs)[0]


def _segment_costates(cell, states, inputs, cts_prev, lam, acc):
    """λ(t-1) = ∂fᵀ/∂H(t-1)·λ(t) + ∂C/∂H(t-1) over one segment, newest step first.

    `states` H(a..b), `inputs` I(a+1..b), `cts_prev` ∂C/∂H(a..b-1) or None, `lam` λ(b)
    (its cost term included), `acc` the running Σ_t ∂fᵀ/∂W·λ(t). Returns λ(a), the new
    sum, and ∂C/∂I(a+1..b).
    """

    def step(carry, xs):
        lam, acc = carry
        h_prev, x, h_next, ct_prev = xs
        b_h, b_x, ct = cell.costate(h_prev, x, h_next, lam)
        # the tie: per-step control gradients summed, each in its control's own dtype
        # (as jax.grad does; with float16 controls and float32 states ct is float32)
        ct = jtu.tree_map(
            lambda c, a: c if c is None or a is None else c.astype(a.dtype),
            _inexact(ct),
            acc,
            is_leaf=_is_none,
        )
        acc = _tree_add(acc, ct)
        lam = b_h if ct_prev is None else b_h + ct_prev
        return (lam, acc), b_x

    xs = (states[:-1], inputs, states[1:], cts_prev)
    (lam, acc), b_inputs = jax.lax.scan(step, (lam, acc), xs, reverse=True)
    return lam, acc, b_inputs


def _mask(perturbed, grads):
    return jtu.tree_map(lambda p, g: g if p else None, perturbed, grads, is_leaf=_is_none)


def _zero_grads(cell):
    return jtu.tree_map(jnp.zeros_like, _inexact(cell))


@eqx.filter_custom_vjp
def _bptt_trajectory(vjp_arg):
    cell, h0, inputs = vjp_arg
    return _run_states(cell, h0, inputs)


@_bptt_trajectory.def_fwd
def _bptt_trajectory_fwd(perturbed, vjp_arg):
    del perturbed
    states = _run_states(*vjp_arg)
    return states, states


@_bptt_trajectory.def_bwd
def _bptt_trajectory_bwd(states, cts, perturbed, vjp_arg):
    cell, h0, inputs = vjp_arg
    if cts is None:
        cts = jnp.zeros_like(states)
    lam0, acc, b_inputs = _segment_costates(
        cell, states, inputs, cts[:-1], cts[-1], _zero_grads(cell)
    )
    return (
        _mask(perturbed[0], acc),
        lam0.astype(h0.dtype) if perturbed[1] else None,
        b_inputs.astype(inputs.dtype) if perturbed[2] else None,
    )


@eqx.filter_custom_vjp
def _bptt_final(vjp_arg, every):
    cell, h0, inputs = vjp_arg
    return _run_final(cell, h0, inputs)


def _segments(inputs, every):
    """Split I(1..T) into q segments of `every` steps and a tail of r < every steps."""
    t = inputs.shape[0]
    q, r = divmod(t, every)
    main = inputs[: q * every].reshape((q, every) + inputs.shape[1:])
    return main, inputs[q * every :], q, r


@_bptt_final.def_fwd
def _bptt_final_fwd(perturbed, vjp_arg, every):
    del perturbed
    cell, h0, inputs = vjp_arg
    if every is None:  # store every state
        states = _run_states(cell, h0, inputs)
        return states[-1], states
    main, tail, q, r = _segments(inputs, every)

    def segment(h, xs):
        return _run_final(cell, h, xs), h

    h_q, starts = jax.lax.scan(segment, h0, main)  # checkpoints H(0), H(k), ..., H((q-1)k)
    h_t = _run_final(cell, h_q, tail) if r else h_q
    return h_t, (starts, h_q)


@_bptt_final.def_bwd
def _bptt_final_bwd(residuals, ct, perturbed, vjp_arg, every):
    cell, h0, inputs = vjp_arg
    acc = _zero_grads(cell)
    if every is None:
        states = residuals
        lam = jnp.zeros_like(states[-1]) if ct is None else ct
        lam0, acc, b_inputs = _segment_costates(cell, states, inputs, None, lam, acc)
    else:
        starts, h_q = residuals
        main, tail, q, r = _segments(inputs, every)
        lam = jnp.zeros_like(h_q) if ct is None else ct
        pieces = []
        if r:  # the tail, recomputed from the last checkpoint
            states = _run_states(cell, h_q, tail)
            lam, acc, b_tail = _segment_costates(cell, states, tail, None, lam, acc)
            pieces.append(b_tail)

        def segment(carry, xs):
            lam, acc = carry
            h_start, seg_inputs = xs
            states = _run_states(cell, h_start, seg_inputs)  # rematerialise k states
            lam, acc, b_seg = _segment_costates(cell, states, seg_inputs, None, lam, acc)
            return (lam, acc), b_seg

        if q:
            (lam, acc), b_main = jax.lax.scan(segment, (lam, acc), (starts, main), reverse=True)
            pieces.insert(0, b_main.reshape((q * every,) + b_main.shape[2:]))
        lam0 = lam
        b_inputs = jnp.concatenate(pieces) if len(pieces) > 1 else pieces[0]
    return (
        _mask(perturbed[0], acc),
        lam0.astype(h0.dtype) if perturbed[1] else None,
        b_inputs.astype(inputs.dtype) if perturbed[2] else None,
    )


def _autodiff_final(cell, h0, inputs, every):
    """Plain reverse mode through `lax.scan`, with `jax.checkpoint` per segment."""
    if every is None:
        return _run_final(cell, h0, inputs)
    main, tail, _, r = _segments(inputs, every)

    @jax.checkpoint
    def segment(h, xs):
        return _run_final(cell, h, xs), None

    h, _ = jax.lax.scan(segment, h0, main)
    return _run_final(cell, h, tail) if r else h


class UnfoldedStep(AbstractStage):
    """Time step t of an unfolded recurrent net as a stage on Z = [H, I(1..T)]:
    Z(t) = [f(H(t-1), I(t); W(t)), I(1..T)]. Built by `RecurrentNet.unfold`."""

    cell: AbstractCell
    step: Int[Array, ""]
    hidden: int = eqx.field(static=True)
    length: int = eqx.field(static=True)
    features: int = eqx.field(static=True)

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


class RecurrentNet(eqx.Module):
    """A time-unfolded recurrent network H(t) = f(H(t-1), I(t); W), t = 1..T, whose
    stages share the controls W of one `cell` (equality constraints W(t) = W).

    Gradients (with `adjoint=CostateAdjoint()`, the default) are the costate recursion
    of the module docstring, run as a reversed `lax.scan` carrying λ(t) and the running
    sum Σ_t ∂fᵀ/∂W·λ(t); `AutodiffAdjoint()` differentiates the plain `lax.scan` instead.

    **Arguments:**

    - `cell`: an `AbstractCell` (e.g. `ElmanCell`).
    - `length`: optional T; inputs of another length raise.
    - `checkpoint_every`: None (store all T+1 states) or k: `__call__` stores only the
      states H(0), H(k), H(2k), … and recomputes each segment of k steps in the
      backward pass (memory ~ (T/k + k)·P·n instead of T·P·n; about one extra forward
      pass of time; k ≈ √T minimises memory). It applies to `__call__` (cost on
      H(T)); `trajectory` returns every state anyway, so it stores them.
    - `adjoint`: `CostateAdjoint()` or `AutodiffAdjoint()`.

    **Calling:** `net(h0, inputs)` returns H(T); `net.trajectory(h0, inputs)` returns
    H(0..T) with leading axis T+1, for a cost on any step. `inputs` is (T, m) for one
    pattern or (T, P, m) for P patterns; `h0` is (n,) (broadcast over patterns) or
    (P, n).
    """

    cell: AbstractCell
    adjoint: AbstractAdjoint
    length: int | None = eqx.field(static=True)
    checkpoint_every: int | None = eqx.field(static=True)

    def __init__(
        self,
        cell: AbstractCell,
        *,
        length: int | None = None,
        checkpoint_every: int | None = None,
        adjoint: AbstractAdjoint = CostateAdjoint(),
    ):
        if not isinstance(cell, AbstractCell):
            raise TypeError(f"RecurrentNet: cell must be an AbstractCell, got {type(cell)}")
        if not isinstance(adjoint, (CostateAdjoint, AutodiffAdjoint)):
            raise TypeError(
                "RecurrentNet: adjoint must be CostateAdjoint() or AutodiffAdjoint(), got "
                f"{type(adjoint).__name__}"
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

    def trajectory(self, h0: Array, inputs: Array) -> Array:
        """H(0..T), leading axis T+1 (then the pattern axis if `inputs` has one)."""
        h0b, xb, added = self._prepare(h0, inputs)
        if isinstance(self.adjoint, AutodiffAdjoint):
            states = _run_states(self.cell, h0b, xb)
        else:
            states = _bptt_trajectory((self.cell, h0b, xb))
        return states[:, 0] if added else states

    def __call__(self, h0: Array, inputs: Array) -> Array:
        """H(T), stored with checkpoints every `checkpoint_every` steps."""
        h0b, xb, added = self._prepare(h0, inputs)
        if isinstance(self.adjoint, AutodiffAdjoint):
            h = _autodiff_final(self.cell, h0b, xb, self.checkpoint_every)
        else:
            h = _bptt_final((self.cell, h0b, xb), self.checkpoint_every)
        return h[0] if added else h

    def unfold(self, h0: Array, inputs: Array) -> tuple[Multistage, Array]:
        """The same network as a core `Multistage` (stacked layout, one `UnfoldedStep`
        per time step, the cell's controls copied T times) and its initial state
        Z(0) = [H(0), I(1..T)]. `costates`, `lagrangian` and `kkt_residuals` apply to it;
        `tied_gradient` sums its per-step control gradients. For checking and inspection
        on small T (the state carries all inputs)."""
        h0b, xb, added = self._prepare(h0, inputs)
        t, p, m = xb.shape
        n = h0b.shape[-1]
        params, static = eqx.partition(self.cell, eqx.is_array)
        copies = jtu.tree_map(lambda a: jnp.broadcast_to(a, (t,) + a.shape), params)
        step = UnfoldedStep(eqx.combine(copies, static), jnp.arange(t), n, t, m)
        z0 = jnp.concatenate([h0b, jnp.moveaxis(xb, 0, 1).reshape(p, t * m)], axis=-1)
        return Multistage(step), (z0[0] if added else z0)

    def tied_gradient(self, unfolded_grads) -> AbstractCell:
        """dC/dW = Σ_t dC/dW(t): the gradient with respect to the shared controls, from
        the gradients of the unfolded system (`costates(...).grads` of `unfold`)."""
        return jtu.tree_map(lambda g: g.sum(axis=0), unfolded_grads.stages.cell)

    def unfolded_states(self, z: Array) -> Array:
        """H from the unfolded states (or costates) Z = [H, I(1..T)]."""
        n = self.cell.hidden_size
        if n is None:
            raise ValueError("unfolded_states needs a cell that declares hidden_size")
        return z[..., :n]
