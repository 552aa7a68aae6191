"""Data parallelism over devices with `jax.sharding`.

The patterns p are the batch axis of the Lagrangian L = Σ_p L_p, so its gradient
dL/dW = Σ_p dL_p/dW splits over devices: each device runs the forward pass and the
costate recursion on its share of the patterns, and XLA sums the control gradients
across devices (an all-reduce it inserts itself). The controls W and the optimiser
state are replicated; nothing here is specific to one device count, so the same code
runs on one CPU, several GPUs, or many hosts after `jax.distributed.initialize()`.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree


class DataParallel(eqx.Module):
    """Shard the patterns over a one-dimensional mesh of devices; replicate the controls.

    **Arguments:**

    - `devices`: the devices of the mesh (default: `jax.devices()`, every device of
      every process — after `jax.distributed.initialize()` that spans all hosts).
    - `axis_name`: the name of the mesh axis (default `"patterns"`).

    Use it as `adjoint.fit(..., parallel=DataParallel())`, or directly:
    `replicate(tree)` places a pytree on every device, `shard(tree)` splits the leading
    (pattern) axis of every array leaf across devices, and inside `jax.jit`
    `constrain_batch(tree)` / `constrain_replicated(tree)` state the same layouts.
    """

    mesh: Mesh = eqx.field(static=True)
    axis_name: str = eqx.field(static=True)

    def __init__(self, devices: Sequence[jax.Device] | None = None, axis_name: str = "patterns"):
        devices = list(jax.devices() if devices is None else devices)
        if not devices:
            raise ValueError("DataParallel: devices must not be empty")
        self.mesh = Mesh(np.array(devices), (axis_name,))
        self.axis_name = axis_name

    @property
    def n_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def batch_sharding(self) -> NamedSharding:
        """Leading (pattern) axis split over the mesh."""
        return NamedSharding(self.mesh, PartitionSpec(self.axis_name))

    @property
    def replicated(self) -> NamedSharding:
        """A full copy on every device."""
        return NamedSharding(self.mesh, PartitionSpec())

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.n_devices:
            raise ValueError(
                f"batch_size {batch_size} must be a multiple of the number of devices "
                f"({self.n_devices}) for data-parallel training"
            )

    def replicate(self, tree: PyTree) -> PyTree:
        """Place every array leaf of `tree` on every device of the mesh."""
        return jtu.tree_map(lambda x: _put(x, self.replicated), tree)

    def shard(self, tree: PyTree) -> PyTree:
        """Split the leading axis of every array leaf of `tree` across the mesh."""

        def put(x):
            if np.ndim(x) == 0 or np.shape(x)[0] % self.n_devices:
                raise ValueError(
                    f"cannot shard an array of shape {np.shape(x)} over {self.n_devices} "
                    "devices: its leading (pattern) axis must be a multiple of the device count"
                )
            return _put(x, self.batch_sharding)

        return jtu.tree_map(put, tree)

    def constrain_batch(self, tree: PyTree) -> PyTree:
        """Inside `jit`: the leading axis of each array leaf is split across devices."""
        return jtu.tree_map(
            lambda x: jax.lax.with_sharding_constraint(x, self.batch_sharding), tree
        )

    def constrain_replicated(self, tree: PyTree) -> PyTree:
        """Inside `jit`: each array leaf is replicated on every device."""
        return jtu.tree_map(lambda x: jax.lax.with_sharding_constraint(x, self.replicated), tree)


def _put(x, sharding: NamedSharding):
    """Host or device array -> global array with `sharding` (multi-host safe: every
    process supplies the same global value and keeps its own shards)."""
    if not eqx.is_array(x):
        return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    host = host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
