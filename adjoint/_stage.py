"""Stages: the elementary systems X(k) = f_k(X(k-1); W(k)) of a multistage system.

A stage maps the state of *one pattern* to the next state (Equinox's convention:
`Multistage` adds the pattern axis with `jax.vmap`). Its inexact array leaves are its
controls W(k). Its backward step is

    costate(x_prev, x_next, b_next) = (∂f_k/∂X(k-1)ᵀ b_next,  ∂f_k/∂W(k)ᵀ b_next),

the transpose of the stage's Jacobian applied to a costate, summed over patterns for the
control part. It is linear in `b_next`, so it serves both sign conventions: fed the
paper's B(k) = −∂C/∂X(k) it returns B's share of B(k-1) and Σ_p Y_p X_p(k-1)ᵀ (the
ascent direction of eq. 9); fed the cotangent ∂C/∂X(k) (what `jax.grad` propagates, and
what `Multistage` uses internally) it returns ∂C/∂X(k-1)'s share and dC/dW(k).
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


# name -> (F, F' written in terms of the output X = F(A), or None if it needs A).
# Writing F' from the output is what lets the recursion store only states.
_ACTIVATIONS: dict[str, tuple[Callable, Callable | None]] = {
    "tanh": (jnp.tanh, lambda x: 1 - x * x),
    "sigmoid": (jax.nn.sigmoid, lambda x: x * (1 - x)),
    "relu": (jax.nn.relu, lambda x: (x > 0).astype(x.dtype)),
    "identity": (lambda a: a, lambda x: jnp.ones_like(x)),
}
_KNOWN_CALLABLES = {
    jnp.tanh: "tanh",
    jax.nn.sigmoid: "sigmoid",
    jax.nn.relu: "relu",
}


def _activation_name(activation: str | Callable) -> str | Callable:
    if isinstance(activation, str):
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; use one of "
                f"{sorted(_ACTIVATIONS)} or a callable"
            )
        return activation
    if not callable(activation):
        raise TypeError(f"activation must be a name or a callable, got {type(activation).__name__}")
    return _KNOWN_CALLABLES.get(activation, activation)


def apply_activation(activation: str | Callable, a: Array) -> Array:
    if isinstance(activation, str):
        return _ACTIVATIONS[activation][0](a)
    return activation(a)


def output_costate(
    activation: str | Callable, x_next: Array, b_next: Array, preactivation: Callable[[], Array]
) -> Array:
    """Y_p = F'(A_p)ᵀ B_p for a batch of patterns (leading axis P).

    Only the named activations (`_ACTIVATIONS`) are known to act elementwise: for them
    F' is the diagonal written in terms of the stored X = F(A). Any other callable may
    mix the units of a pattern (e.g. a / |a|), so it is transposed exactly with
    `jax.vjp` on A recomputed by `preactivation()`, one pattern at a time (as the
    forward pass applies it), never on the whole batch at once.
    """
    if isinstance(activation, str):
        return _ACTIVATIONS[activation][1](x_next) * b_next
    _, f_vjp = jax.vjp(jax.vmap(activation), preactivation())
    (y,) = f_vjp(b_next)
    return y


class AbstractStage(eqx.Module):
    """One stage X(k) = f_k(X(k-1); W(k)) of a multistage system.

    Subclasses implement `__call__` on the state of a single pattern. They may
    override `costate` with an analytic adjoint; the default is `jax.vjp` of the
    stage alone (which recomputes the stage's forward pass in the backward pass).
    Declaring `in_shape`/`out_shape` lets `Multistage` check at construction that the
    stages chain.
    """

    @abc.abstractmethod
    def __call__(self, x: Array) -> Array:
        """Forward dynamics of one pattern: X(k) = f_k(X(k-1))."""

    @property
    def in_shape(self) -> tuple[int, ...] | None:
        """Shape of one pattern's X(k-1), or None if the stage does not declare it."""
        return None

    @property
    def out_shape(self) -> tuple[int, ...] | None:
        """Shape of one pattern's X(k), or None if the stage does not declare it."""
        return None

    def costate(self, x_prev: Array, x_next: Array, b_next: Array) -> tuple[Array, "AbstractStage"]:
        """Backward step of the costate recursion for a batch of patterns.

        **Arguments:** `x_prev` X(k-1) and `x_next` X(k), both with a leading pattern
        axis P; `b_next`, a costate shaped like `x_next`.

        **Returns:** `(∂f_kᵀ/∂X(k-1) · b_next, ∂f_kᵀ/∂W(k) · b_next)`: the first per
        pattern, the second a stage-shaped pytree summed over patterns.
        """
        del x_next
        _, vjp = eqx.filter_vjp(lambda s, x: jax.vmap(s)(x), self, x_prev)
        stage_ct, b_prev = vjp(b_next)
        return b_prev, stage_ct


class Dense(AbstractStage):
    """A fully connected stage X(k) = F(W(k) X(k-1) + b(k)) (eq. 1–2 of the paper).

    Its analytic adjoint implements, for a batch of patterns p,

        Y_p   = F'(A_p(k)) ⊙ B_p(k)          (F' recomputed from the stored X(k))
        B_p(k-1) = W(k)ᵀ Y_p                  (backward pass)
        ∂W(k) = Σ_p Y_p X_p(k-1)ᵀ,  ∂b(k) = Σ_p Y_p   (optimality condition)

    For tanh, sigmoid, relu and identity F' is written in terms of X(k) = F(A(k)), so
    only the states are stored; any other callable (which may mix the units of a
    pattern, e.g. a / |a|) is differentiated with `jax.vjp` on A(k) recomputed.

    **Arguments:**

    - `in_size`, `out_size`: sizes of X(k-1) and X(k).
    - `activation`: `"tanh"` (default), `"sigmoid"`, `"relu"`, `"identity"` or any
      callable mapping one pattern's A(k) to X(k).
    - `use_bias`: whether to include b(k).
    - `dtype`: floating dtype of the controls (default: JAX's default float).
    - `key`: a `jax.random` key for the initialisation U(−1/√in, 1/√in).
    """

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"] | None
    activation: str | Callable = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        out_size: int,
        activation: str | Callable = "tanh",
        *,
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        for name, size in (("in_size", in_size), ("out_size", out_size)):
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"Dense: {name} must be a positive int, got {size!r}")
        if dtype is None:
            dtype = jnp.zeros(()).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"Dense: dtype must be floating, got {dtype}")
        wkey, bkey = jax.random.split(key)
        lim = 1 / in_size**0.5
        self.weight = jax.random.uniform(wkey, (out_size, in_size), dtype, minval=-lim, maxval=lim)
        self.bias = (
            jax.random.uniform(bkey, (out_size,), dtype, minval=-lim, maxval=lim)
            if use_bias
            else None
        )
        self.activation = _activation_name(activation)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.weight.shape[-1:]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.weight.shape[-2:-1]

    def _preactivation(self, x: Array) -> Array:
        # W x + b in the state's dtype (float16 weights on float32 states, ...)
        a = x @ self.weight.T.astype(x.dtype)
        return a if self.bias is None else a + self.bias.astype(x.dtype)

    def __call__(self, x: Float[Array, " in"]) -> Float[Array, " out"]:
        return apply_activation(self.activation, self._preactivation(x))

    def costate(self, x_prev, x_next, b_next):
        y = output_costate(self.activation, x_next, b_next, lambda: self._preactivation(x_prev))
        b_prev = y @ self.weight.astype(y.dtype)
        d_weight = y.T @ x_prev
        if self.bias is None:
            return b_prev, eqx.tree_at(lambda s: s.weight, self, d_weight)
        d_bias = y.sum(axis=0)
        return b_prev, eqx.tree_at(lambda s: (s.weight, s.bias), self, (d_weight, d_bias))
