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

The header records a fingerprint of the state (each leaf's path, shape and dtype), so a
directory holding another model's checkpoints is recognised (`CheckpointMismatchError`)
instead of being pruned or misread. The temporary name carries the writer's pid and host
(`.ckpt-<pid>@<host>-<random>.tmp`), so that only the files of a writer that is no longer
running are cleaned up (`remove_stale_temporaries`), never another writer's in-flight file.
"""

import hashlib
import io
import json
import os
import re
import socket
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
_TMP = re.compile(r"^\.ckpt-(\d+)@(.*)-[^-]*\.tmp$")


class CheckpointError(ValueError):
    """A checkpoint file is corrupted, truncated, or does not match the expected state."""


class CheckpointMismatchError(CheckpointError):
    """An intact checkpoint file that holds another state (another model or optimiser:
    a different tree structure, shapes or dtypes)."""


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


def state_fingerprint(state: PyTree) -> str:
    """A digest of the structure of a state: each leaf's path, shape and dtype (not its
    values). Equal for the states of one model and optimiser across processes."""
    rows = []
    for path, leaf in jtu.tree_leaves_with_path(state):
        rows.append(
            f"{jtu.keystr(path)}:{tuple(np.shape(leaf))}:{np.dtype(getattr(leaf, 'dtype', None))}"
        )
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:32]


def _host_name() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # no cheap, safe probe: assume the writer may still run
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, under another user
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Delete the temporary files left in `directory` by writers that are no longer
    running (killed mid-write): those named for a pid on this host that does not exist.
    Another writer's in-flight file, or one from another host, is left alone.

    **Returns:** the paths removed.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    host, removed = _host_name(), []
    for name in os.listdir(directory):
        m = _TMP.match(name)
        if m is None or m.group(2) != host or _pid_alive(int(m.group(1))):
            continue
        path = os.path.join(directory, name)
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


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
    head["fingerprint"] = state_fingerprint(state)
    head_bytes = json.dumps(head, allow_nan=True).encode()
    body = _MAGIC + struct.pack("<Q", len(head_bytes)) + head_bytes + payload.getvalue()
    data = body + hashlib.sha256(body).digest()
    path = checkpoint_path(directory, step)
    prefix = f".ckpt-{os.getpid()}@{_host_name()}-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
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


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a checkpoint file, without reading or verifying its payload.

    **Raises:** `CheckpointError` if the file is not a checkpoint or its header is cut.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        start = f.read(len(_MAGIC) + 8)
        if len(start) < len(_MAGIC) + 8 or not start.startswith(_MAGIC):
            raise CheckpointError(f"{path}: not a checkpoint or truncated")
        (n_head,) = struct.unpack("<Q", start[len(_MAGIC) :])
        raw = f.read(min(n_head, 1 << 26))
    try:
        if len(raw) != n_head:
            raise ValueError("header cut short")
        return json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable header ({err})") from None


def load_checkpoint(path: str | os.PathLike, like: PyTree) -> Checkpoint:
    """Read and verify one checkpoint file.

    **Arguments:** the `path` and a pytree `like` with the same structure, shapes and
    dtypes as the saved state (NumPy arrays, JAX arrays or `jax.ShapeDtypeStruct`s).

    **Raises:** `CheckpointError` naming the file if it is truncated or fails its SHA-256
    checksum; `CheckpointMismatchError` (a `CheckpointError`) if it is intact but does
    not match `like`.
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
    fingerprint = header.get("fingerprint")
    if fingerprint is not None and fingerprint != state_fingerprint(like):
        raise CheckpointMismatchError(
            f"{path}: does not match the training state (it holds another model or "
            "optimiser state: other leaves, shapes or dtypes)"
        )
    payload = io.BytesIO(body[start + n_head :])
    like = jtu.tree_map(
        lambda x: np.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x,
        host_tree(like),
    )
    try:
        state = eqx.tree_deserialise_leaves(payload, like)
    except Exception as err:  # shape/dtype mismatch, short payload
        raise CheckpointMismatchError(
            f"{path}: does not match the training state ({type(err).__name__}: {err})"
        ) from None
    if payload.tell() != len(payload.getvalue()):
        raise CheckpointMismatchError(f"{path}: payload longer than the training state")
    return Checkpoint(int(header["step"]), state, header, path)


def latest_checkpoint(directory: str | os.PathLike, like: PyTree) -> Checkpoint | None:
    """The newest checkpoint in `directory` that reads back and verifies, or None.

    Corrupted, truncated or mismatched files are skipped with a `UserWarning` naming
    each one, falling back to the previous checkpoint. (`fit` refuses a directory that
    holds another state's checkpoints instead: see `foreign_checkpoints`.)
    """
    for _, path in list_checkpoints(directory):
        try:
            return load_checkpoint(path, like)
        except (CheckpointError, OSError) as err:
            warnings.warn(f"skipping checkpoint {path}: {err}", stacklevel=2)
    return None


def scan_checkpoints(
    directory: str | os.PathLike, like: PyTree
) -> tuple[Checkpoint | None, list[str]]:
    """Where a run of the state `like` resumes in `directory`, and who else is there.

    **Returns:** `(latest, foreign)`: the newest checkpoint of `like` that reads back and
    verifies (corrupted or truncated files before it are skipped with a `UserWarning`
    naming each one), or None; and the intact checkpoints that hold another state
    (newest first), found from their headers' fingerprints or, for files without one,
    on reading them.
    """
    foreign = foreign_checkpoints(directory, like)
    latest = None
    for _, path in list_checkpoints(directory):
        if path in foreign:
            continue
        try:
            latest = load_checkpoint(path, like)
            break
        except CheckpointMismatchError:
            foreign.append(path)
        except (CheckpointError, OSError) as err:
            warnings.warn(f"skipping checkpoint {path}: {err}", stacklevel=3)
    return latest, foreign


def _intact(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    return len(data) > _DIGEST and hashlib.sha256(data[:-_DIGEST]).digest() == data[-_DIGEST:]


def foreign_checkpoints(directory: str | os.PathLike, like: PyTree) -> list[str]:
    """The intact checkpoints in `directory` whose header names another state than
    `like` (newest first). Files without a fingerprint, or that fail their checksum
    (corrupted, not foreign), are not listed."""
    fingerprint, found = state_fingerprint(like), []
    for _, path in list_checkpoints(directory):
        try:
            theirs = read_header(path).get("fingerprint")
        except (CheckpointError, OSError):
            continue
        if theirs is not None and theirs != fingerprint and _intact(path):
            found.append(path)
    return found


def prune_checkpoints(
    directory: str | os.PathLike,
    keep: int,
    like: PyTree | None = None,
    protect: str | os.PathLike | None = None,
) -> None:
    """Delete all but the `keep` newest checkpoints.

    With `like`, only checkpoints of that state count and are deleted: another model's
    files (another fingerprint) are left alone, whatever their step numbers. `protect`
    (e.g. the file just written) is never deleted. Temporary files are not touched (see
    `remove_stale_temporaries`).
    """
    directory = os.fspath(directory)
    ours = list_checkpoints(directory)
    if like is not None:
        foreign = set(foreign_checkpoints(directory, like))
        ours = [(step, path) for step, path in ours if path not in foreign]
    protect = None if protect is None else os.path.abspath(os.fspath(protect))
    for i, (_, path) in enumerate(ours):
        if i < keep or os.path.abspath(path) == protect:
            continue
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
