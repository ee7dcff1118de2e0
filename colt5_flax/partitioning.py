"""The device mesh, the logical axis rules, and the shardings of state and batches.

Sharding is data (flax `examples/lm1b` style): parameters carry logical axis names
(`nn.with_logical_partitioning`, t5x's vocabulary), the rules below map those names onto
the two mesh axes, and `Partitioner` turns the result into `NamedSharding`s for
`jax.jit(in_shardings=..., out_shardings=...)`.

Mesh: `('data', 'model')` of shape `(num_devices // num_partitions, num_partitions)`:
`num_partitions` (gin macro `NUM_PARTITIONS`) is the model-parallel size, t5x's
`PjitPartitioner.num_partitions`; the rest of the devices split the batch.

Multi-host: call `initialize_distributed()` before anything touches a device (the entry
points do it behind `--multiprocess`). Every host reads the same global batch and
`Partitioner.shard_global_batch` keeps the rows its devices hold, so the data does not
depend on the number of hosts (docs/multihost.md). `Partitioner.shard_batch` assembles a
global batch from per-host pieces instead, for callers that split the data themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import seqio
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any
LogicalAxisRules = Sequence[tuple[str, str | None]]

DATA_AXIS = "data"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, MODEL_AXIS)


def standard_logical_axis_rules() -> tuple[tuple[str, str | None], ...]:
  """t5x's `standard_logical_axis_rules` for a ('data', 'model') mesh.

  The batch splits over `data`; the wide axes of the matmuls (MLP hidden units, heads,
  the vocabulary, joined head*kv) over `model` (Megatron-style model parallelism); the
  model width `embed`, per-head width `kv`, the K/V heads of multi-query attention
  (`kv_heads`, often a single head), sequence length, relative-position buckets and
  scanned `layers` stay whole.
  """
  return (
      ("batch", DATA_AXIS),
      ("vocab", MODEL_AXIS),
      ("mlp", MODEL_AXIS),
      ("heads", MODEL_AXIS),
      ("joined_kv", MODEL_AXIS),
      ("embed", None),
      ("kv", None),
      ("kv_heads", None),
      ("length", None),
      ("relpos_buckets", None),
      ("layers", None),
  )


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_seconds: int = 100,
    initialization_timeout: int = 300,
) -> None:
  """`jax.distributed.initialize` for multi-host runs; call before touching any device.

  On TPU pods and SLURM/Open MPI clusters every argument may stay None (JAX detects them);
  elsewhere pass the coordinator's `host:port`, the number of processes and this one's id.

  `heartbeat_timeout_seconds`: JAX's coordination service declares a process that sent no
  heartbeat for this long dead, and the others then fail with an error naming it (rather
  than waiting forever in a collective). `initialization_timeout`: how long to wait for
  every process to join.
  """
  jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      heartbeat_timeout_seconds=heartbeat_timeout_seconds,
      initialization_timeout=initialization_timeout,
  )
  logging.info(
      "jax.distributed: process %d of %d, %d local of %d devices (heartbeat timeout %d s)",
      jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
      heartbeat_timeout_seconds,
  )


_barrier_counts: dict[str, int] = {}


def barrier(name: str, timeout_seconds: int = 1800) -> None:
  """Every process waits here until all arrive (no-op with one process).

  On JAX's coordination service (not a device collective), so a process that is minutes
  behind (compiling, reading its data) is waited for. CPU collectives (gloo) give up
  when a peer joins a new communicator more than 30 s late, so the trainer meets here
  before its first step. Each call of the same `name` is a new barrier.
  """
  if jax.process_count() == 1:
    return
  import orbax.checkpoint as ocp

  count = _barrier_counts[name] = _barrier_counts.get(name, 0) + 1
  ocp.multihost.sync_global_processes(f"colt5_{name}_{count}", timeout=timeout_seconds)


def all_processes(condition: bool) -> bool:
  """Whether `condition` holds on every process (each passes its own; no-op with one)."""
  if jax.process_count() == 1:
    return bool(condition)
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.asarray([bool(condition)], np.int32))
  return bool(np.all(flags))


def create_mesh(num_partitions: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `('data', 'model')` mesh of shape `(len(devices) // num_partitions, num_partitions)`.

  Raises:
    ValueError: if `num_partitions` does not divide the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  if not isinstance(num_partitions, int) or num_partitions < 1:
    raise ValueError(f"NUM_PARTITIONS must be a positive integer, got {num_partitions!r}")
  if len(devices) % num_partitions:
    raise ValueError(
        f"NUM_PARTITIONS={num_partitions} does not divide the {len(devices)} devices "
        f"({devices[0].platform}); the model-parallel size must divide the device count"
    )
  shape = (len(devices) // num_partitions, num_partitions)
  # Auto axes: XLA propagates shardings from the constraints we give (t5x's pjit model),
  # rather than jax's explicit sharding-in-types mode.
  return jax.make_mesh(
      shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices
  )


@dataclasses.dataclass(frozen=True)
class Partitioner:
  """The mesh and the rules, and the shardings derived from them.

  Attributes:
    num_partitions: model-parallel size (`NUM_PARTITIONS`); data-parallel size is
      `num_devices // num_partitions`.
    logical_axis_rules: `(logical name, mesh axis or None)` pairs; gin binds them.
    devices: the devices of the mesh (default: all of `jax.devices()`).
    constrain_activations: trace the steps under the rules, so that the layers'
      `nn.with_logical_constraint(x, ('batch', 'length', 'embed'))` pin activations
      (t5x's behaviour). False leaves activation layouts to XLA's propagation from the
      parameter and batch shardings.
  """

  num_partitions: int = 1
  logical_axis_rules: LogicalAxisRules = dataclasses.field(
      default_factory=standard_logical_axis_rules
  )
  devices: Sequence[jax.Device] | None = None
  constrain_activations: bool = True

  @functools.cached_property
  def mesh(self) -> Mesh:
    return create_mesh(self.num_partitions, self.devices)

  @property
  def data_parallel_size(self) -> int:
    return self.mesh.shape[DATA_AXIS]

  @property
  def model_parallel_size(self) -> int:
    return self.mesh.shape[MODEL_AXIS]

  def check_batch_size(self, batch_size: int, name: str = "BATCH_SIZE") -> None:
    """Raises ValueError unless `batch_size` splits evenly over `data` and over hosts."""
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"{name} must be a positive integer, got {batch_size!r}")
    if batch_size % self.data_parallel_size:
      raise ValueError(
          f"{name}={batch_size} is not divisible by the data-parallel size "
          f"{self.data_parallel_size} (= {self.mesh.devices.size} devices / "
          f"NUM_PARTITIONS={self.num_partitions})"
      )
    if batch_size % jax.process_count():
      raise ValueError(
          f"{name}={batch_size} is not divisible by the {jax.process_count()} hosts"
      )

  @contextlib.contextmanager
  def context(self) -> Iterator[None]:
    """The mesh (and the rules, with `constrain_activations`) for tracing the steps."""
    rules = self.logical_axis_rules if self.constrain_activations else ()
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(rules):
      yield

  # -- Shardings ------------------------------------------------------------------------

  def logical_to_sharding(self, logical_specs: PyTree) -> PyTree:
    """A tree of logical `PartitionSpec`s -> the same tree of `NamedSharding`s."""
    return nn.logical_to_mesh_sharding(logical_specs, self.mesh, self.logical_axis_rules)

  def variables_sharding(self, abstract_variables: PyTree) -> PyTree:
    """Shardings of (boxed) variables, e.g. `jax.eval_shape(model.get_initial_variables)`.

    Leaves without logical names (unboxed arrays) are replicated.
    """
    return self.logical_to_sharding(nn.get_partition_spec(abstract_variables))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  @property
  def data_sharding(self) -> NamedSharding:
    """Batch features `[batch, ...]`: the leading axis split over `data`."""
    return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

  # -- Data -----------------------------------------------------------------------------

  def host_shard_info(self) -> seqio.ShardInfo:
    """This host's index among the hosts, as a `seqio.ShardInfo` (for per-host splits;
    the trainer reads the global batch on every host instead)."""
    return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())

  def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """This host's rows `[batch / num_hosts, ...]` -> global arrays `[batch, ...]` on `data`."""
    return {
        name: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(value))
        for name, value in local_batch.items()
    }

  def shard_global_batch(self, global_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """A batch every host holds entirely `[batch, ...]` -> global arrays on `data`.

    For evaluation and inference, where each host reads the whole split.
    """
    sharding = self.data_sharding

    def put(value):
      value = np.asarray(value)
      return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return {name: put(value) for name, value in global_batch.items()}


def with_sharding(abstract_tree: PyTree, shardings: PyTree) -> PyTree:
  """`jax.ShapeDtypeStruct`s carrying `shardings` (restore targets, AOT lowering)."""
  return jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      abstract_tree,
      shardings,
  )


def check_divisible(abstract_tree: PyTree, shardings: PyTree, what: str = "parameter") -> None:
  """Raises ValueError naming the first array whose sharded axes do not divide evenly.

  Run before compiling, so that e.g. 2 heads on a 4-way `model` axis is reported as
  such rather than as an XLA error.
  """
  flat = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  for (path, leaf), sharding in zip(flat, jax.tree.leaves(shardings), strict=True):
    spec = tuple(sharding.spec)
    for axis, mesh_axes in enumerate(spec):
      if mesh_axes is None:
        continue
      names = mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)
      ways = int(np.prod([sharding.mesh.shape[name] for name in names]))
      if leaf.shape[axis] % ways:
        raise ValueError(
            f"{what} {'/'.join(_path_names(path))} of shape {tuple(leaf.shape)} cannot be "
            f"split {ways} ways along axis {axis} over mesh axes {names} (mesh "
            f"{dict(sharding.mesh.shape)}); choose NUM_PARTITIONS dividing that size or "
            "change the logical axis rules"
        )


def derived_sharding(
    abstract_tree: PyTree, reference_abstract: PyTree, reference_shardings: PyTree, mesh: Mesh
) -> PyTree:
  """Shardings for a tree whose leaves track the leaves of a reference tree.

  Optimizer states mirror the parameters (Adam's moments), or keep a reduced copy
  (Adafactor's factored row/column statistics drop one axis). Each leaf takes the
  sharding of the parameter whose tree path ends its own path: the same spec for the
  same shape, the spec without the reduced axis for one axis fewer, replicated
  otherwise (step counters, scalars).

  Args:
    abstract_tree: e.g. `jax.eval_shape(optimizer.init, params)`.
    reference_abstract: the parameters (arrays or `ShapeDtypeStruct`s).
    reference_shardings: their `NamedSharding`s.
    mesh: the mesh (for replicated leaves).
  """
  by_path: dict[tuple, tuple[tuple[int, ...], PartitionSpec]] = {}
  flat_reference = jax.tree_util.tree_flatten_with_path(reference_abstract)[0]
  flat_shardings = jax.tree.leaves(reference_shardings)
  for (path, leaf), sharding in zip(flat_reference, flat_shardings, strict=True):
    by_path[_path_names(path)] = (tuple(leaf.shape), sharding.spec)

  def sharding_of(path, leaf):
    names = _path_names(path)
    shape = tuple(leaf.shape)
    for start in range(len(names)):
      match = by_path.get(names[start:])
      if match is None:
        continue
      reference_shape, spec = match
      spec = tuple(spec) + (None,) * (len(reference_shape) - len(spec))
      if shape == reference_shape:
        return NamedSharding(mesh, PartitionSpec(*spec))
      if len(shape) == len(reference_shape) - 1:
        # Prefer dropping the last matching axis, as factored statistics usually do.
        for dropped in reversed(range(len(reference_shape))):
          if shape == reference_shape[:dropped] + reference_shape[dropped + 1 :]:
            return NamedSharding(mesh, PartitionSpec(*(spec[:dropped] + spec[dropped + 1 :])))
      break
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree_util.tree_map_with_path(sharding_of, abstract_tree)


def _path_names(path) -> tuple[str, ...]:
  names = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        names.append(str(getattr(key, attribute)))
        break
    else:
      names.append(str(key))
  return tuple(names)


def log_topology(partitioner: Partitioner, batch_size: int) -> None:
  """What t5x users look for first: the mesh, the processes, and each host's rows."""
  mesh = partitioner.mesh
  local_devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  local_slices = partitioner.data_sharding.addressable_devices_indices_map((batch_size,))
  local_rows = len({index[0].indices(batch_size) for index in local_slices.values()}) * (
      batch_size // partitioner.data_parallel_size
  )
  logging.info(
      "Mesh %s over %d %s devices, %d process(es) (this is process %d, %d local devices); "
      "global batch %d, %d rows per host",
      dict(mesh.shape), mesh.devices.size, mesh.devices.flat[0].platform,
      jax.process_count(), jax.process_index(), len(local_devices), batch_size, local_rows,
  )
