"""Residual stages and skip connections (§3 of LeCun, 1988) on the core `Multistage`.

- **Residual stages.** X(k) = X(k-1) + g(X(k-1)) needs no augmentation: it is a stage
  with adjoint B(k-1) = B(k) + ∂gᵀ/∂X · B(k).
- **Skip connections.** A stage that reads earlier states X(j), j < k − 1, becomes an
  ordinary stage of an *augmented* system whose state Z(k) carries, besides X(k), the
  earlier states that later stages still read. The core recursion then sums, for every
  state, the contributions of all the stages that read it (a carried copy's costate is
  added to the costate of the stage that reads it), and `costates`, `lagrangian` and
  `kkt_residuals` work unchanged.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array

from ._misc import _inexact, _is_none
from ._multistage import Multistage
from ._stage import AbstractStage


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
