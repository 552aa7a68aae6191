"""Checkpoints that lose nothing: atomic, checksummed, never pickled.

A checkpoint holds the whole training state of `adjoint.fit` — the controls W (the
model's inexact arrays), the optimiser state, the step counter and the RNG key — as
raw arrays written by `eqx.tree_serialise_leaves` (NumPy's `.npy` format, no pickle),
plus a small JSON header (step, metrics history).

File layout (`ckpt-<step>.adj`):

    b"ADJCKPT1"                 8-byte magic
    header length (uint64, little endian)
    header (UTF-8 JSON)
    payload (eqx.tree_serialise_leaves of the state)
    SHA-256 of everything above (32 bytes)

The file is written to a temporary name in the same directory, flushed and fsynced,
then renamed with `os.replace` (atomic on POSIX and Windows), and the directory is
fsynced. A reader therefore sees either a complete old checkpoint or a complete new one;
a file that was truncated or altered afterwards fails the checksum and is skipped with a
warning naming it.
"""

import hashlib
import io
import json
import os
import re
import struct
import tempfile
import warnings
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree


_MAGIC = b"ADJCKPT1"
_DIGEST = 32
_NAME = re.compile(r"^ckpt-(\d{10})\.adj$")


class CheckpointError(ValueError):
    """A checkpoint file is corrupted, truncated, or does not match the expected state."""


class Checkpoint(NamedTuple):
    """A checkpoint read back from disk: `step`, the `state` pytree, its JSON `header`
    (which includes the metrics history) and the `path` it came from."""

    step: int
    state: PyTree
    header: dict
    path: str


def checkpoint_path(directory: str | os.PathLike, step: int) -> str:
    """The file name of the checkpoint taken after `step` steps."""
    return os.path.join(os.fspath(directory), f"ckpt-{int(step):010d}.adj")


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, str]]:
    """All checkpoint files in `directory` as `(step, path)`, newest first. Temporary
    files left by an interrupted write are not listed."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _NAME.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found, reverse=True)


def _to_host(x):
    """A NumPy copy of an array leaf (for replicated multi-host arrays, the local copy)."""
    if isinstance(x, jax.Array):
        if not x.is_fully_addressable:
            x = x.addressable_data(0)
        return np.asarray(x)
    return x


def host_tree(tree: PyTree) -> PyTree:
    """`tree` with every JAX array copied to a NumPy array on the host."""
    return jtu.tree_map(_to_host, tree)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    directory: str | os.PathLike, step: int, state: PyTree, header: dict | None = None
) -> str:
    """Write `state` (a pytree of arrays) as the checkpoint for `step`, atomically.

    **Arguments:** the `directory` (created if missing), the `step`, the `state` pytree
    (serialised with `eqx.tree_serialise_leaves`; typed PRNG keys must be converted with
    `jax.random.key_data` first) and an optional JSON-serialisable `header`.

    **Returns:** the path written.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    payload = io.BytesIO()
    eqx.tree_serialise_leaves(payload, host_tree(state))
    head = dict(header or {})
    head["step"] = int(step)
    head["format"] = 1
    head_bytes = json.dumps(head, allow_nan=True).encode()
    body = _MAGIC + struct.pack("<Q", len(head_bytes)) + head_bytes + payload.getvalue()
    data = body + hashlib.sha256(body).digest()
    path = checkpoint_path(directory, step)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    return path


def load_checkpoint(path: str | os.PathLike, like: PyTree) -> Checkpoint:
    """Read and verify one checkpoint file.

    **Arguments:** the `path` and a pytree `like` with the same structure, shapes and
    dtypes as the saved state (NumPy arrays, JAX arrays or `jax.ShapeDtypeStruct`s).

    **Raises:** `CheckpointError` naming the file if it is truncated, fails its SHA-256
    checksum, or does not match `like`.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < len(_MAGIC) + 8 + _DIGEST or not data.startswith(_MAGIC):
        raise CheckpointError(f"{path}: not a checkpoint or truncated ({len(data)} bytes)")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch (file truncated or corrupted)")
    (n_head,) = struct.unpack("<Q", body[len(_MAGIC) : len(_MAGIC) + 8])
    start = len(_MAGIC) + 8
    try:
        header = json.loads(body[start : start + n_head].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable header ({err})") from None
    payload = io.BytesIO(body[start + n_head :])
    like = jtu.tree_map(
        lambda x: np.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x,
        host_tree(like),
    )
    try:
        state = eqx.tree_deserialise_leaves(payload, like)
    except Exception as err:  # shape/dtype mismatch, short payload
        raise CheckpointError(
            f"{path}: does not match the training state ({type(err).__name__}: {err})"
        ) from None
    if payload.tell() != len(payload.getvalue()):
        raise CheckpointError(f"{path}: payload longer than the training state")
    return Checkpoint(int(header["step"]), state, header, path)


def latest_checkpoint(directory: str | os.PathLike, like: PyTree) -> Checkpoint | None:
    """The newest checkpoint in `directory` that reads back and verifies, or None.

    Corrupted, truncated or mismatched files are skipped with a `UserWarning` naming
    each one, falling back to the previous checkpoint.
    """
    for _, path in list_checkpoints(directory):
        try:
            return load_checkpoint(path, like)
        except (CheckpointError, OSError) as err:
            warnings.warn(f"skipping checkpoint {path}: {err}", stacklevel=2)
    return None


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints (and stale temporary files)."""
    directory = os.fspath(directory)
    stale = [
        os.path.join(directory, name)
        for name in os.listdir(directory)
        if name.startswith(".ckpt-") and name.endswith(".tmp")
    ]
    for path in [p for _, p in list_checkpoints(directory)[keep:]] + stale:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x
