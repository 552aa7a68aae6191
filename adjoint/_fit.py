"""`fit`: a jit-compiled training loop with checkpoints and data parallelism.

Each step is steepest descent on the Lagrangian of a minibatch of patterns (eq. 9 of
the paper, with any optax optimiser in place of the fixed step λ):

    X(k) = F(W(k) X(k-1))                              forward pass     (∂L/∂B = 0)
    B(N) = −∂C/∂X(N),  B(k-1) = ∂f_kᵀ/∂X(k-1) · B(k)   backward pass    (∂L/∂X = 0)
    ∂L/∂W(k) = −Σ_p Y_p(k) X_p(k-1)ᵀ                  optimality condition
    W ← W + optax_update(∂L/∂W)

For a `Multistage` the gradient is the model's own costate recursion (its `adjoint`);
for any other Equinox model it is whatever `jax.grad` runs. Many steps run inside one
`jax.jit` as a loop over minibatches, so Python dispatch does not dominate small
models.
"""

import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from jaxtyping import Array, PRNGKeyArray, PyTree, Scalar

from ._checkpoint import (
    CheckpointMismatchError,
    _jsonable,
    host_tree,
    prune_checkpoints,
    remove_stale_temporaries,
    save_checkpoint,
    scan_checkpoints,
)
from ._data_parallel import DataParallel
from ._results import RESULTS


class NonFiniteLossError(FloatingPointError):
    """Training stopped because the loss became NaN or infinite."""


class FitResult(eqx.Module):
    """What `fit` returns.

    - `model`: the trained model (controls W after the last good step).
    - `opt_state`: the optimiser state at that step.
    - `num_steps`: the number of optimiser steps taken in total (including resumed ones).
    - `key`: the RNG key that drives the minibatch order.
    - `history`: `{"step": int array, "loss": array}` — the minibatch loss at every step
      (evaluated before that step's update) — plus `"eval_step"` and one array per
      metric returned by `eval_fn`, `"eval_<name>"` (or `"eval"` for a scalar).
    - `resumed_from`: the checkpoint step training resumed from, or None.
    - `checkpoint`: the path of the newest checkpoint written or read, or None.
    - `result`: `RESULTS.successful`, or `RESULTS.nonfinite` when the loss became
      non-finite (with `throw=False`; then `model` is the state at `num_steps`, and
      `history` also holds the finite losses of the failed chunk, up to the first
      non-finite one).
    """

    model: PyTree
    opt_state: PyTree
    num_steps: int
    key: PRNGKeyArray
    history: dict
    resumed_from: int | None
    checkpoint: str | None
    result: RESULTS

    @property
    def step(self) -> int:
        """Deprecated name of `num_steps` (removed in the next release)."""
        warnings.warn("FitResult.step is deprecated: use num_steps", DeprecationWarning, 2)
        return self.num_steps

    @property
    def stop_reason(self) -> str:
        """Deprecated: `"finished"` or `"non-finite loss"`; read `result` instead."""
        warnings.warn("FitResult.stop_reason is deprecated: use result", DeprecationWarning, 2)
        return "finished" if self.result == RESULTS.successful else "non-finite loss"


def _n_patterns(data: PyTree) -> int:
    leaves = jtu.tree_leaves(data)
    if not leaves:
        raise ValueError("fit: data has no arrays; pass e.g. (inputs, targets)")
    sizes = {np.shape(x)[0] if np.ndim(x) > 0 else None for x in leaves}
    if None in sizes:
        raise ValueError("fit: every array in data needs a leading pattern axis; got a scalar")
    if len(sizes) != 1:
        shapes = [np.shape(x) for x in leaves]
        raise ValueError(
            f"fit: every array in data must have the same number of patterns (leading "
            f"axis); got shapes {shapes}"
        )
    return sizes.pop()


def _as_key(key) -> PRNGKeyArray:
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    key = jnp.asarray(key)
    if key.dtype != jnp.uint32:
        raise TypeError(f"fit: key must be a jax.random key, got dtype {key.dtype}")
    return jax.random.wrap_key_data(key)


def _history_to_json(history: dict) -> dict:
    return {k: _jsonable(v) for k, v in history.items()}


def _history_from_json(header: dict, loss_dtype) -> dict:
    hist = header.get("history", {})
    out = {"step": list(hist.get("step", [])), "loss": list(hist.get("loss", []))}
    out["eval"] = list(hist.get("eval", []))
    out["loss_dtype"] = loss_dtype
    return out


def _finish_history(raw: dict) -> dict:
    out = {
        "step": np.asarray(raw["step"], dtype=np.int64),
        "loss": np.asarray(raw["loss"], dtype=raw["loss_dtype"]),
    }
    evals = raw["eval"]
    out["eval_step"] = np.asarray([e["step"] for e in evals], dtype=np.int64)
    names = sorted({k for e in evals for k in e if k != "step"})
    for name in names:
        col = "eval" if name == "" else f"eval_{name}"
        out[col] = np.asarray([e.get(name, np.nan) for e in evals], dtype=np.float64)
    return out


def _eval_record(step: int, value: Any) -> dict:
    rec = {"step": int(step)}
    if isinstance(value, dict):
        for k, v in value.items():
            rec[str(k)] = float(np.asarray(host_tree(v)))
    else:
        rec[""] = float(np.asarray(host_tree(value)))
    return rec


def _next_boundary(step: int, steps: int, *periods: int | None) -> int:
    """The next step after `step` that is a multiple of one of `periods`, or `steps`.
    Dispatch boundaries depend only on absolute step numbers, so a resumed run runs
    exactly the same chunks as an uninterrupted one."""
    nxt = steps
    for p in periods:
        if p:
            nxt = min(nxt, (step // p + 1) * p)
    return nxt


class _ChunkConfig(NamedTuple):
    batch_size: int
    n_patterns: int
    full_batch: bool
    steps_per_dispatch: int


def epoch_permutation(key: PRNGKeyArray, epoch: int, n_patterns: int) -> np.ndarray:
    """The order in which `fit` visits the patterns in epoch `epoch` (0-based).

    A permutation of 0..n_patterns−1 drawn on the host by NumPy's PCG64, seeded with the
    key's data and the epoch number: deterministic, independent of the device count,
    and cheap next to a sort on the device. Epoch e's step i uses patterns
    `perm[i·batch_size : (i+1)·batch_size]`; the last `n_patterns mod batch_size` of
    each permutation are skipped that epoch.
    """
    words = np.asarray(jax.random.key_data(key)).astype(np.uint32).ravel().tolist()
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(words + [int(epoch)])))
    return rng.permutation(n_patterns).astype(np.int32)


def _loss_shape(loss, params, static, data, batch_size: int) -> jax.ShapeDtypeStruct:
    """Check that `loss(model, batch)` runs on a minibatch and returns a scalar."""
    batch = jtu.tree_map(lambda x: jax.ShapeDtypeStruct((batch_size,) + x.shape[1:], x.dtype), data)
    try:
        out = jax.eval_shape(lambda p, b: loss(eqx.combine(p, static), b), params, batch)
    except Exception as err:
        raise ValueError(
            f"fit: loss(model, batch) failed on a batch shaped like data with {batch_size} "
            f"patterns: {type(err).__name__}: {err}"
        ) from None
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        raise ValueError(f"fit: loss must return a scalar, got {getattr(out, 'shape', out)}")
    return out


def _check_carry_dtypes(before: PyTree, after: PyTree) -> None:
    """At trace time: the optimiser state must keep its dtypes across a step, since the
    steps run in a compiled loop (else a one-line error instead of XLA's carry error)."""
    if jtu.tree_structure(before) != jtu.tree_structure(after):
        return  # lax.fori_loop names the difference in structure itself
    for (path, a), b in zip(jtu.tree_leaves_with_path(before), jtu.tree_leaves(after)):
        da, db = getattr(a, "dtype", None), getattr(b, "dtype", None)
        if da != db:
            raise TypeError(
                f"fit: optimizer.update changes the dtype of its state at "
                f"opt_state{jtu.keystr(path)} from {da} to {db}; fit runs the steps in a "
                "compiled loop, which needs them equal: give the model and the optimiser "
                "one floating dtype (e.g. cast the model to float32)"
            )


@eqx.filter_jit
def _run_chunk(n, params, opt_state, step, perms, data, static, loss, optimizer, parallel, config):
    """`n` (≤ steps_per_dispatch, a traced value) optimiser steps from `step`, in one
    compiled loop. `perms[r]` is the pattern order of epoch step // per_epoch + r.
    Everything but arrays is static, so one compilation serves every chunk length and
    every later `fit` call with the same model, loss and optimiser."""
    per_epoch = config.n_patterns // config.batch_size
    first_epoch = step // per_epoch

    def one_step(j, carry):
        params, opt_state, losses = carry
        s = step + j
        if config.full_batch:
            batch = data
        else:
            row, i = s // per_epoch - first_epoch, s % per_epoch
            idx = jax.lax.dynamic_slice(perms, (row, i * config.batch_size), (1, config.batch_size))
            batch = jtu.tree_map(lambda x: jnp.take(x, idx[0], axis=0), data)
        if parallel is not None:
            batch = parallel.constrain_batch(batch)
        # forward pass, costate recursion (the model's adjoint) and ∂L/∂W in one call
        value, grads = jax.value_and_grad(lambda p: loss(eqx.combine(p, static), batch))(params)
        # optax is not strict-promotion clean (Adam's bias correction raises a Python
        # float to an int32 power): its update runs under standard promotion
        with jax.numpy_dtype_promotion("standard"):
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
        _check_carry_dtypes(opt_state, new_opt_state)
        opt_state = new_opt_state
        # each control keeps its own dtype (as optax.apply_updates does), so a float16
        # model stays float16 even where an update comes out in float32
        params = jtu.tree_map(
            lambda new, old: new.astype(old.dtype), eqx.apply_updates(params, updates), params
        )
        if parallel is not None:
            params, opt_state = parallel.constrain_replicated((params, opt_state))
        losses = losses.at[j].set(value)
        return params, opt_state, losses

    out = _loss_shape(loss, params, static, data, config.batch_size)  # at trace time only
    losses = jnp.zeros((config.steps_per_dispatch,), out.dtype)
    params, opt_state, losses = jax.lax.fori_loop(0, n, one_step, (params, opt_state, losses))
    return params, opt_state, losses


class _Permutations:
    """Host-side epoch permutations for the chunks, uploaded only when they change."""

    def __init__(self, key, config: _ChunkConfig, parallel: DataParallel | None):
        self.key, self.config, self.parallel = key, config, parallel
        self.per_epoch = config.n_patterns // config.batch_size
        self.rows = (config.steps_per_dispatch - 1) // self.per_epoch + 2
        self.cache: dict[int, np.ndarray] = {}
        self.uploaded = (None, None)

    def __call__(self, step: int, n: int):
        if self.config.full_batch:
            epochs = ()
            host = np.zeros((1, 0), np.int32)
        else:
            first, last = step // self.per_epoch, (step + n - 1) // self.per_epoch
            epochs = tuple(range(first, last + 1))
            if self.uploaded[0] == epochs:
                return self.uploaded[1]
            for e in epochs:
                if e not in self.cache:
                    self.cache[e] = epoch_permutation(self.key, e, self.config.n_patterns)
            self.cache = {e: self.cache[e] for e in epochs}
            rows = [self.cache[e] for e in epochs]
            rows += [rows[-1]] * (self.rows - len(rows))
            host = np.stack(rows)
        perms = self.parallel.replicate(host) if self.parallel is not None else jnp.asarray(host)
        self.uploaded = (epochs, perms)
        return perms


@no_type_check  # checks its own arguments, naming the one at fault
def fit(
    model: PyTree,
    loss: Callable[[PyTree, PyTree], Scalar],
    data: PyTree[Array],
    optimizer: optax.GradientTransformation,
    *,
    steps: int,
    batch_size: int | None = None,
    key: PRNGKeyArray,
    steps_per_dispatch: int = 100,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 3,
    eval_fn: Callable[[PyTree], Any] | None = None,
    eval_every: int | None = None,
    log: Callable[[int, dict], None] | None = None,
    progress: bool | None = None,
    parallel: DataParallel | None = None,
    opt_state: PyTree | None = None,
    throw: bool = True,
) -> FitResult:
    """Train `model` by minimising `loss(model, batch)` with an optax optimiser.

    Every step draws a minibatch of `batch_size` patterns (a fresh permutation of the
    patterns each epoch, from `key`: `_fit.epoch_permutation`), computes the loss and its
    gradient dL/dW — for a `Multistage`, by its costate recursion — and applies
    `optimizer`. Up to `steps_per_dispatch` steps run inside one `jax.jit` call (a
    `lax.fori_loop` over minibatches).

    **Arguments:**

    - `model`: any Equinox model; its inexact arrays are the controls W being trained.
    - `loss`: `loss(model, batch) -> scalar`, `batch` shaped like `data` with
      `batch_size` patterns.
    - `data`: a pytree of arrays sharing a leading pattern axis, e.g. `(inputs, targets)`.
    - `optimizer`: any `optax.GradientTransformation`.
    - `steps`: total number of optimiser steps (including steps done before a resume).
    - `batch_size`: patterns per step (default: all of them, in order: full-batch
      steepest descent).
    - `key`: a `jax.random` key for the minibatch order.
    - `steps_per_dispatch`: steps per compiled call.
    - `checkpoint_dir`: if given, resume from the newest valid checkpoint there (a
      corrupted or truncated file is skipped with a warning naming it) and write one
      every `checkpoint_every` steps (default 1000) and at the end; the
      `keep_checkpoints` newest are kept. A directory that holds another model's (or
      optimiser's) checkpoints is refused with a `CheckpointMismatchError` naming them;
      temporary files of a writer killed mid-write are removed at the start.
    - `eval_fn`, `eval_every`: call `eval_fn(model)` (a scalar or a dict of scalars)
      every `eval_every` steps (default: `steps_per_dispatch`) and at the end; recorded
      in `history`.
    - `log`: called as `log(step, metrics)` after each evaluation point (also without
      `eval_fn`), `metrics` holding `"loss"` (mean minibatch loss since the last call)
      and the `eval_fn` values.
    - `progress`: show a tqdm progress bar (default: only when stderr is a terminal).
    - `parallel`: a `DataParallel` to shard each minibatch over devices (controls and
      optimiser state replicated; XLA sums the gradients across devices).
    - `opt_state`: an optimiser state to start from (default `optimizer.init`).
    - `throw`: if the loss becomes non-finite, raise `NonFiniteLossError` (default) or,
      if False, stop and return the last good state with `result=RESULTS.nonfinite`.
      Either way no checkpoint is written for the bad state.

    **Returns:** a `FitResult`.

    On CPU, a run killed at any moment (even SIGKILL) and restarted with the same
    arguments ends bit-identical to an uninterrupted run: minibatch order depends only
    on (key, step), and compiled chunks start at the same absolute steps.
    """
    # ---- arguments ------------------------------------------------------------------
    for name, val in (("steps", steps), ("steps_per_dispatch", steps_per_dispatch)):
        if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < 0:
            raise ValueError(f"fit: {name} must be a non-negative int, got {val!r}")
    if steps_per_dispatch < 1:
        raise ValueError(f"fit: steps_per_dispatch must be at least 1, got {steps_per_dispatch}")
    for name, val in (("checkpoint_every", checkpoint_every), ("eval_every", eval_every)):
        if val is not None and (not isinstance(val, (int, np.integer)) or val < 1):
            raise ValueError(f"fit: {name} must be a positive int or None, got {val!r}")
    if not isinstance(keep_checkpoints, int) or keep_checkpoints < 1:
        raise ValueError(f"fit: keep_checkpoints must be at least 1, got {keep_checkpoints!r}")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            f"fit: optimizer must be an optax.GradientTransformation, got "
            f"{type(optimizer).__name__}"
        )
    if not callable(loss):
        raise TypeError(f"fit: loss must be callable as loss(model, batch), got {loss!r}")
    if parallel is not None and not isinstance(parallel, DataParallel):
        raise TypeError(f"fit: parallel must be a DataParallel, got {type(parallel).__name__}")
    steps = int(steps)
    n_patterns = _n_patterns(data)
    full_batch = batch_size is None or batch_size == n_patterns
    if batch_size is None:
        batch_size = n_patterns
    if not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= n_patterns:
        raise ValueError(
            f"fit: batch_size must be an int in 1..{n_patterns} (the number of patterns), "
            f"got {batch_size!r}"
        )
    batch_size = int(batch_size)
    if parallel is not None:
        parallel.check_batch_size(batch_size)
    if checkpoint_dir is not None and checkpoint_every is None:
        checkpoint_every = 1000
    if eval_every is None:
        eval_every = steps_per_dispatch if (eval_fn is not None or log is not None) else None
    key = _as_key(key)

    params, static = eqx.partition(model, eqx.is_inexact_array)
    if not jtu.tree_leaves(params):
        raise ValueError("fit: the model has no inexact arrays (controls) to train")
    if opt_state is None:
        opt_state = optimizer.init(params)

    # ---- resume ---------------------------------------------------------------------
    step = 0
    resumed_from = None
    ckpt_path = None
    loss_dtype = jtu.tree_leaves(params)[0].dtype  # until the first chunk says otherwise
    raw_history = {"step": [], "loss": [], "eval": [], "loss_dtype": loss_dtype}
    is_writer = jax.process_index() == 0
    like = None
    if checkpoint_dir is not None:
        like = {
            "params": params,
            "opt_state": opt_state,
            "step": np.zeros((), np.int64),
            "key": jax.random.key_data(key),
        }
        if is_writer:  # a killed writer's half-written files; never a running one's
            remove_stale_temporaries(checkpoint_dir)
        found, foreign = scan_checkpoints(checkpoint_dir, like)
        if foreign:
            names = ", ".join(os.path.basename(p) for p in foreign[:3])
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise CheckpointMismatchError(
                f"fit: checkpoint_dir {os.fspath(checkpoint_dir)} holds checkpoints of "
                f"another model or optimiser state ({names}{more}); fit would resume from "
                "or prune them: use a separate checkpoint_dir for each model"
            )
        if found is not None:
            if found.step > steps:
                raise ValueError(
                    f"fit: checkpoint {found.path} is at step {found.step}, beyond steps={steps}: "
                    f"pass steps >= {found.step} to continue it, or an empty checkpoint_dir "
                    "to start over"
                )
            saved_bs = found.header.get("batch_size")
            if saved_bs is not None and saved_bs != batch_size:
                warnings.warn(
                    f"fit: resuming from {found.path} written with batch_size={saved_bs}, now "
                    f"{batch_size}: the minibatch order differs from the original run",
                    stacklevel=2,
                )
            state = found.state
            params, opt_state = state["params"], state["opt_state"]
            saved_key = jax.random.wrap_key_data(state["key"], impl=jax.random.key_impl(key))
            if not np.array_equal(state["key"], np.asarray(jax.random.key_data(key))):
                warnings.warn(
                    f"fit: resuming from {found.path} with the key stored there, not the "
                    "key passed in",
                    stacklevel=2,
                )
            key = saved_key
            step = resumed_from = int(state["step"])
            ckpt_path = found.path
            raw_history = _history_from_json(found.header, loss_dtype)

    # ---- placement ------------------------------------------------------------------
    if parallel is not None:
        params, opt_state, data = parallel.replicate((params, opt_state, data))
    else:
        params, opt_state, data = jtu.tree_map(jnp.asarray, (params, opt_state, data))

    # ---- the compiled chunk -----------------------------------------------------------
    config = _ChunkConfig(batch_size, n_patterns, full_batch, steps_per_dispatch)

    permutations = _Permutations(key, config, parallel)

    def chunk(n, params, opt_state, step, data):
        return _run_chunk(
            jnp.asarray(n, jnp.int32),
            params,
            opt_state,
            jnp.asarray(step, jnp.int32),
            permutations(step, n),
            data,
            static,
            loss,
            optimizer,
            parallel,
            config,
        )

    # ---- the loop ---------------------------------------------------------------------
    if progress is None:
        progress = sys.stderr.isatty()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=step, desc="fit", unit="step", dynamic_ncols=True)
    result = RESULTS.successful
    since_log: list[float] = []
    try:
        while step < steps:
            end = _next_boundary(step, steps, steps_per_dispatch, checkpoint_every, eval_every)
            n = end - step
            new_params, new_opt_state, losses = chunk(n, params, opt_state, step, data)
            losses = np.asarray(host_tree(losses))[:n]
            raw_history["loss_dtype"] = losses.dtype
            finite = np.isfinite(losses)
            if not finite.all():
                bad = int(np.argmin(finite))
                raw_history["step"].extend(range(step + 1, step + bad + 1))
                raw_history["loss"].extend(losses[:bad].tolist())
                where = (
                    f"the last good checkpoint is kept: {ckpt_path}"
                    if ckpt_path is not None
                    else "no checkpoint was written"
                    + (" (checkpoint_dir=None)" if checkpoint_dir is None else "")
                )
                msg = (
                    f"fit: the loss became non-finite ({losses[bad]}) at step {step + bad + 1}; "
                    f"training stopped and {where}. Lower the learning rate, check the "
                    "data, or enable float64."
                )
                if throw:
                    raise NonFiniteLossError(msg)
                warnings.warn(msg, stacklevel=2)
                result = RESULTS.nonfinite
                break
            params, opt_state = new_params, new_opt_state
            raw_history["step"].extend(range(step + 1, end + 1))
            raw_history["loss"].extend(losses.tolist())
            since_log.extend(losses.tolist())
            step = end
            if bar is not None:
                bar.update(n)
                bar.set_postfix(loss=f"{float(losses[-1]):.4g}")
            at_eval = eval_every is not None and (step % eval_every == 0 or step == steps)
            if at_eval:
                metrics = {}
                if eval_fn is not None:
                    rec = _eval_record(step, eval_fn(eqx.combine(params, static)))
                    raw_history["eval"].append(rec)
                    metrics = {("eval" if k == "" else k): v for k, v in rec.items()}
                    metrics.pop("step")
                if log is not None:
                    log(step, {"loss": float(np.mean(since_log)), **metrics})
                since_log = []
            if checkpoint_dir is not None and (step % checkpoint_every == 0 or step == steps):
                state = {
                    "params": params,
                    "opt_state": opt_state,
                    "step": np.asarray(step, np.int64),
                    "key": jax.random.key_data(key),
                }
                header = {
                    "batch_size": batch_size,
                    "history": _history_to_json({k: raw_history[k] for k in ("step", "loss")})
                    | {"eval": raw_history["eval"]},
                }
                if is_writer:
                    ckpt_path = save_checkpoint(checkpoint_dir, step, state, header)
                    # only this state's files count, and the one just written stays
                    prune_checkpoints(checkpoint_dir, keep_checkpoints, like, protect=ckpt_path)
    finally:
        if bar is not None:
            bar.close()

    return FitResult(
        model=eqx.combine(params, static),
        opt_state=opt_state,
        num_steps=step,
        key=key,
        history=_finish_history(raw_history),
        resumed_from=resumed_from,
        checkpoint=ckpt_path,
        result=result,
    )
