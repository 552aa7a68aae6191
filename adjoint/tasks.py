"""Built-in training tasks, generated in code, for `adjoint train TASK` and `adjoint demo`.

Each task is a multistage system of `Dense` stages X(k) = F(W(k) X(k-1) + b(k)) and the
paper's squared-error performance index, averaged over patterns:

    C = (1/P) Σ_p |D_p − X_p(N)|²,       so B_p(N) = (2/P) (D_p − X_p(N)).

Targets are ±1 (tanh output units), as in the paper's examples.

- `xor`: the four patterns of two-bit parity.
- `parity`: all 2⁴ patterns of four-bit parity.
- `shift`: shift-invariant motif recognition: two mirror-image 4-bit motifs placed at
  every circular shift of a 12-unit ring, with noisy copies; classify the motif.
- `completion`: Pineda's (1987) pattern completion: a few stored ±1 patterns with some
  units hidden (set to 0); reproduce the whole pattern. (Solved here by a feed-forward
  multistage net; the recurrent, continuous-time version is the CTRNN's job.)
- `spirals`: two interleaved spirals in the plane.
"""

from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from . import datasets
from ._multistage import Multistage
from ._stage import Dense


def shift_motifs(
    n_units: int = 12, *, key: PRNGKeyArray, copies: int = 4, noise: float = 0.2, dtype=None
) -> tuple[Array, Array]:
    """Two mirror-image motifs (+1 +1 −1 +1 and +1 −1 +1 +1) on a ring of `n_units`
    units (background −1), at every circular shift, plus `copies − 1` noisy copies of
    each. Target +1 for the first motif, −1 for the second. The class does not depend on
    the shift: the task rewards shift invariance."""
    if n_units < 5:
        raise ValueError(f"shift_motifs: n_units must be at least 5, got {n_units}")
    if copies < 1:
        raise ValueError(f"shift_motifs: copies must be at least 1, got {copies}")
    dtype = dtype or jnp.zeros(()).dtype
    motifs = jnp.asarray([[1, 1, -1, 1], [1, -1, 1, 1]], dtype)
    base = jnp.full((2, n_units), -1.0, dtype).at[:, :4].set(motifs)
    shifts = jnp.arange(n_units)
    x = jax.vmap(lambda row: jax.vmap(lambda s: jnp.roll(row, s))(shifts))(base)
    x = x.reshape(2 * n_units, n_units)
    y = jnp.repeat(jnp.asarray([[1.0], [-1.0]], dtype), n_units, axis=0)
    x = jnp.tile(x, (copies, 1))
    y = jnp.tile(y, (copies, 1))
    jitter = noise * jax.random.normal(key, x.shape, dtype)
    jitter = jitter.at[: 2 * n_units].set(0)  # the first copy is clean
    return (x + jitter).astype(dtype), y


def pattern_completion(
    n_units: int = 10,
    n_patterns: int = 4,
    n_hidden_units: int = 3,
    *,
    key: PRNGKeyArray,
    copies: int = 16,
    dtype=None,
) -> tuple[Array, Array]:
    """Pineda's pattern completion: `n_patterns` random ±1 patterns of `n_units` units;
    each input is a stored pattern with `n_hidden_units` random units set to 0, the
    target is the complete pattern. `copies` masked versions of each pattern."""
    if not 0 <= n_hidden_units < n_units:
        raise ValueError(
            f"pattern_completion: n_hidden_units must be in 0..{n_units - 1}, got {n_hidden_units}"
        )
    dtype = dtype or jnp.zeros(()).dtype
    pkey, mkey = jax.random.split(key)
    stored = jnp.where(jax.random.bernoulli(pkey, 0.5, (n_patterns, n_units)), 1.0, -1.0)
    stored = stored.astype(dtype)
    keys = jax.random.split(mkey, n_patterns * copies)
    hidden = jax.vmap(lambda k: jax.random.permutation(k, n_units) < n_hidden_units)(keys)
    targets = jnp.repeat(stored, copies, axis=0)
    inputs = jnp.where(hidden, 0.0, targets).astype(dtype)
    return inputs, targets


class Task(NamedTuple):
    """A built-in task: data generator, layer sizes and default training settings."""

    name: str
    description: str
    sizes: tuple[int, ...]
    make_data: Callable[[PRNGKeyArray, object], tuple[Array, Array]]
    steps: int
    batch_size: int | None
    learning_rate: float

    def model(self, key: PRNGKeyArray, dtype=None) -> Multistage:
        """A Multistage of tanh `Dense` stages with this task's layer sizes."""

        def build(key):
            keys = jax.random.split(key, len(self.sizes) - 1)
            stages = [
                Dense(a, b, "tanh", dtype=dtype, key=k)
                for a, b, k in zip(self.sizes[:-1], self.sizes[1:], keys)
            ]
            return Multistage(stages)

        return eqx.filter_jit(build)(key)  # one compiled call, not one dispatch per op

    def data(self, key: PRNGKeyArray, dtype=None) -> tuple[Array, Array]:
        """`(inputs, targets)`, both with a leading pattern axis."""
        return jax.jit(lambda k: self.make_data(k, dtype))(key)


def mse(model, batch) -> Array:
    """C = (1/P) Σ_p |D_p − X_p(N)|² on a batch `(inputs, targets)`."""
    x, d = batch
    return jnp.mean(jnp.sum((d - model(x)) ** 2, axis=-1))


def accuracy(model, batch) -> Array:
    """Fraction of output units whose sign matches the ±1 target."""
    x, d = batch
    return jnp.mean(jnp.sign(model(x)) == jnp.sign(d))


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "xor",
            "two-bit parity (XOR), 4 patterns, 2-4-1",
            (2, 4, 1),
            lambda key, dtype: datasets.parity(2, dtype=dtype),
            500,
            None,
            0.05,
        ),
        Task(
            "parity",
            "four-bit parity, 16 patterns, 4-16-1",
            (4, 16, 1),
            lambda key, dtype: datasets.parity(4, dtype=dtype),
            1500,
            None,
            0.02,
        ),
        Task(
            "shift",
            "shift-invariant motif recognition on a 12-unit ring, 96 patterns, 12-16-8-1",
            (12, 16, 8, 1),
            lambda key, dtype: shift_motifs(12, key=key, dtype=dtype),
            1500,
            32,
            0.01,
        ),
        Task(
            "completion",
            "Pineda pattern completion: 4 stored 10-unit patterns, 3 units hidden, 10-16-10",
            (10, 16, 10),
            lambda key, dtype: pattern_completion(10, 4, 3, key=key, dtype=dtype),
            1000,
            16,
            0.01,
        ),
        Task(
            "spirals",
            "two interleaved spirals, 200 patterns, 2-32-32-1",
            (2, 32, 32, 1),
            lambda key, dtype: datasets.spirals(200, key=key, dtype=dtype),
            3000,
            None,
            0.01,
        ),
    ]
}
