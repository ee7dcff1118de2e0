"""TrainState and the jitted train, eval and predict steps over a mesh.

`Trainer` holds what the steps need (the model, the optimizer, the schedule, the
partitioner) and builds the state sharded from the start: `jax.eval_shape` of the
initialisation → logical `PartitionSpec`s (`nn.get_partition_spec`) → `NamedSharding`s →
`jax.jit(init, out_shardings=...)`, as flax's `examples/lm1b` does. The train step is
one `jax.jit` with the state's shardings in and out and the state donated.

Gradient accumulation (`num_microbatches`, t5x's name) runs inside the step with
`jax.lax.scan`: one step is one optimizer update whatever the number of microbatches,
and the accumulated gradient equals the gradient of the whole batch's loss (each
microbatch's gradient is weighted by its share of the batch's loss normaliser).

Dropout keys are a pure function of (seed, step): `fold_in(state.rng, state.step)`, so a
run resumed from a checkpoint replays the same randomness bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from colt5_flax import partitioning

PyTree = Any
Batch = Mapping[str, jax.Array]

# Metrics of `model.loss_fn` and how microbatches and eval batches combine them.
_LOSS_METRICS = ("loss", "z_loss", "cross_ent_loss")
_TOKEN_AVERAGED_METRICS = ("accuracy",)
_SUMMED_METRICS = ("num_tokens",)


@flax.struct.dataclass
class TrainState:
  """Everything a bit-exact resume needs.

  Attributes:
    step: int32 [], optimizer updates applied so far.
    params: float32 parameter tree (unboxed; shardings live in `Trainer.state_sharding`).
    opt_state: the optax state.
    rng: uint32 [2] key data; the dropout key of step `s` is `fold_in(rng, s)`.
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  rng: jax.Array


def encdec_batch_shapes(
    batch_size: int, task_feature_lengths: Mapping[str, int], *, pack: bool = False
) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of what `seqio.EncDecFeatureConverter` emits for `batch_size` rows.

  `encoder_input_tokens` [batch, inputs], `decoder_{input,target}_tokens` and
  `decoder_loss_weights` [batch, targets] (int32); with `pack`, also the
  `*_segment_ids` and `*_positions` of both sides.
  """
  for key in ("inputs", "targets"):
    value = task_feature_lengths.get(key) if isinstance(task_feature_lengths, Mapping) else None
    if not isinstance(value, int) or value < 1:
      raise ValueError(
          f"TASK_FEATURE_LENGTHS must map 'inputs' and 'targets' to positive ints, got "
          f"{task_feature_lengths!r}"
      )
  inputs = (batch_size, task_feature_lengths["inputs"])
  targets = (batch_size, task_feature_lengths["targets"])
  shapes = {
      "encoder_input_tokens": inputs,
      "decoder_target_tokens": targets,
      "decoder_input_tokens": targets,
      "decoder_loss_weights": targets,
  }
  if pack:
    shapes.update(
        encoder_segment_ids=inputs,
        encoder_positions=inputs,
        decoder_segment_ids=targets,
        decoder_positions=targets,
    )
  return {name: jax.ShapeDtypeStruct(shape, jnp.int32) for name, shape in shapes.items()}


def combine_metrics(
    stacked: Mapping[str, jax.Array],
    *,
    loss_normalizing_factor: float | None = None,
    per_token: bool = False,
) -> dict[str, jax.Array]:
  """Combines `loss_fn` metrics of several (micro)batches, each stacked on axis 0 `[n]`.

  `model.loss_fn` divides each batch's summed loss by `max(num_tokens, 1)` (or by a fixed
  `loss_normalizing_factor`). Undoing that per batch and dividing the total by the total
  gives exactly the loss of the concatenated batch; accuracy is weighted by tokens,
  `num_tokens` summed, and the rest (routing statistics) averaged.

  Args:
    stacked: `{name: [n]}`.
    loss_normalizing_factor: the model's fixed factor, or None (per-token normalised).
    per_token: report losses per token even with a fixed factor (evaluation).
  Returns:
    `{name: []}`.
  """
  num_tokens = jnp.asarray(stacked["num_tokens"], jnp.float32)
  total_tokens = jnp.maximum(jnp.sum(num_tokens), 1.0)
  token_weights = jnp.maximum(num_tokens, 1.0)
  if loss_normalizing_factor is None:
    loss_weights, loss_divisor = token_weights, total_tokens
  else:
    loss_weights = jnp.full_like(num_tokens, loss_normalizing_factor)
    loss_divisor = total_tokens if per_token else jnp.float32(loss_normalizing_factor)
  combined = {}
  for name, values in stacked.items():
    values = jnp.asarray(values, jnp.float32)
    if name in _SUMMED_METRICS:
      combined[name] = jnp.sum(values)
    elif name in _LOSS_METRICS:
      combined[name] = jnp.sum(values * loss_weights) / loss_divisor
    elif name in _TOKEN_AVERAGED_METRICS:
      combined[name] = jnp.sum(values * token_weights) / total_tokens
    else:
      combined[name] = jnp.mean(values)
  return combined


def split_microbatches(batch: Batch, num_microbatches: int) -> dict[str, jax.Array]:
  """`[batch, ...]` -> `[num_microbatches, batch / num_microbatches, ...]`.

  Row `r` of the batch goes to microbatch `r % num_microbatches`: each device's rows stay
  on that device (a contiguous split would move each microbatch onto a subset of the
  `data` devices).
  """

  def split(x):
    rows = x.shape[0] // num_microbatches
    x = x.reshape((rows, num_microbatches) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return {name: split(value) for name, value in batch.items()}


class Trainer:
  """The model's train, eval and predict steps, jitted over a `Partitioner`'s mesh.

  Args:
    model: a `model.EncoderDecoderModel` (anything with t5x's `get_initial_variables`,
      `loss_fn`, `predict_batch`, `score_batch`).
    partitioner: the mesh and logical axis rules.
    optimizer: the optax transformation (e.g. `optimizers.adafactor(schedule)`); None for
      evaluation and inference only.
    learning_rate_schedule: the schedule the optimizer uses; logged as `learning_rate`.
    batch_shapes: `{feature: ShapeDtypeStruct}` of one global training batch
      (`encdec_batch_shapes`).
    num_microbatches: gradient accumulation steps per optimizer update; must divide the
      batch size, and the microbatch size must divide over `data`.
    seed: initialisation and dropout seed.
  """

  def __init__(
      self,
      model,
      partitioner: partitioning.Partitioner,
      optimizer: optax.GradientTransformation | None,
      learning_rate_schedule: Callable[[jax.Array], jax.Array] | None,
      batch_shapes: Mapping[str, jax.ShapeDtypeStruct],
      *,
      num_microbatches: int = 1,
      seed: int = 0,
  ):
    self.model = model
    self.partitioner = partitioner
    self.optimizer = optimizer
    self.learning_rate_schedule = learning_rate_schedule
    self.batch_shapes = dict(batch_shapes)
    self.num_microbatches = num_microbatches
    self.seed = seed
    batch_size = next(iter(self.batch_shapes.values())).shape[0]
    partitioner.check_batch_size(batch_size)
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
      raise ValueError(f"num_microbatches must be a positive int, got {num_microbatches!r}")
    if batch_size % num_microbatches:
      raise ValueError(
          f"num_microbatches={num_microbatches} does not divide BATCH_SIZE={batch_size}"
      )
    if num_microbatches > 1:
      partitioner.check_batch_size(batch_size // num_microbatches, name="microbatch size")
    self._compiled_train_step = None
    self._compiled_steps: dict[tuple, Any] = {}

  # -- State ----------------------------------------------------------------------------

  def _init_shapes(self) -> dict[str, tuple[int, ...]]:
    # Parameters do not depend on the batch: initialise on one row per `data` shard.
    rows = self.partitioner.data_parallel_size
    return {name: (rows,) + tuple(s.shape[1:]) for name, s in self.batch_shapes.items()}

  def _initial_params(self, init_key):
    variables = self.model.get_initial_variables(init_key, self._init_shapes())
    return variables["params"]

  def _keys(self):
    init_key, dropout_key = jax.random.split(jax.random.key(self.seed))
    return init_key, jax.random.key_data(dropout_key)

  @functools.cached_property
  def params_sharding(self) -> PyTree:
    init_key, _ = self._keys()
    boxed = jax.eval_shape(self._initial_params, init_key)
    return self.partitioner.variables_sharding(boxed)

  @functools.cached_property
  def abstract_params(self) -> PyTree:
    init_key, _ = self._keys()
    unboxed = jax.eval_shape(lambda k: nn.meta.unbox(self._initial_params(k)), init_key)
    partitioning.check_divisible(unboxed, self.params_sharding)
    return partitioning.with_sharding(unboxed, self.params_sharding)

  def _state_from_params(self, params, rng) -> TrainState:
    if self.optimizer is None:
      raise ValueError("This Trainer has no optimizer: it can evaluate and predict only")
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=self.optimizer.init(params),
        rng=rng,
    )

  @functools.cached_property
  def state_sharding(self) -> TrainState:
    if self.optimizer is None:
      raise ValueError("This Trainer has no optimizer: it can evaluate and predict only")
    mesh = self.partitioner.mesh
    abstract_params = self.abstract_params
    abstract_opt_state = jax.eval_shape(self.optimizer.init, abstract_params)
    return TrainState(
        step=self.partitioner.replicated,
        params=self.params_sharding,
        opt_state=partitioning.derived_sharding(
            abstract_opt_state, abstract_params, self.params_sharding, mesh
        ),
        rng=self.partitioner.replicated,
    )

  @functools.cached_property
  def abstract_state(self) -> TrainState:
    """The state as `ShapeDtypeStruct`s with shardings (a restore target)."""
    _, rng = self._keys()
    shapes = jax.eval_shape(self._state_from_params, self.abstract_params, rng)
    return partitioning.with_sharding(shapes, self.state_sharding)

  def create_state(self) -> TrainState:
    """A fresh state, created directly in its shards (never whole on one device)."""
    init_key, rng = self._keys()

    def init():
      params = nn.meta.unbox(self._initial_params(init_key))
      return self._state_from_params(params, rng)

    # Traced without the logical rules: only the parameters leave this jit, so XLA drops
    # the forward pass and its activation constraints; the out_shardings place the state.
    # (Under the rules, flax's DenseGeneral would constrain its flattened kernel with the
    # unflattened kernel's names during initialisation.)
    return jax.jit(init, out_shardings=self.state_sharding)()

  def state_from_params(self, params: PyTree) -> TrainState:
    """A step-0 state around given parameters (fine-tuning from a checkpoint)."""
    _, rng = self._keys()
    return jax.jit(
        lambda p: self._state_from_params(p, rng),
        in_shardings=(self.params_sharding,),
        out_shardings=self.state_sharding,
    )(params)

  # -- Training -------------------------------------------------------------------------

  def _gradients(self, params, batch, step_key):
    """Gradient of the whole batch's loss, and its metrics (microbatched when asked)."""
    grad_fn = jax.value_and_grad(self.model.loss_fn, has_aux=True)
    if self.num_microbatches == 1:
      (_, metrics), grads = grad_fn(params, batch, step_key)
      return grads, metrics

    normalizing_factor = getattr(self.model, "loss_normalizing_factor", None)
    microbatches = split_microbatches(batch, self.num_microbatches)
    microbatches = jax.lax.with_sharding_constraint(
        microbatches,
        jax.sharding.NamedSharding(
            self.partitioner.mesh, jax.sharding.PartitionSpec(None, partitioning.DATA_AXIS)
        ),
    )

    def accumulate(grad_sum, inputs):
      index, microbatch = inputs
      (_, metrics), grads = grad_fn(params, microbatch, jax.random.fold_in(step_key, index))
      if normalizing_factor is None:
        # loss_fn divided this microbatch's summed loss by its token count: undo that, so
        # that dividing by the batch's token count below gives the whole-batch gradient.
        weight = jnp.maximum(jnp.asarray(metrics["num_tokens"], jnp.float32), 1.0)
      else:
        weight = jnp.float32(1.0)
      grad_sum = jax.tree.map(lambda s, g: s + weight * g, grad_sum, grads)
      return grad_sum, metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, stacked = jax.lax.scan(
        accumulate, zeros, (jnp.arange(self.num_microbatches), microbatches)
    )
    metrics = combine_metrics(stacked, loss_normalizing_factor=normalizing_factor)
    if normalizing_factor is None:
      divisor = jnp.maximum(metrics["num_tokens"], 1.0)
      grad_sum = jax.tree.map(lambda g: g / divisor, grad_sum)
    return grad_sum, metrics

  def _train_step(self, state: TrainState, batch: Batch):
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grads, metrics = self._gradients(state.params, batch, step_key)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    if self.learning_rate_schedule is not None:
      metrics["learning_rate"] = jnp.asarray(
          self.learning_rate_schedule(state.step), jnp.float32
      )
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  @functools.cached_property
  def _jitted_train_step(self):
    return jax.jit(
        self._train_step,
        in_shardings=(self.state_sharding, self.partitioner.data_sharding),
        out_shardings=(self.state_sharding, self.partitioner.replicated),
        donate_argnums=(0,),
    )

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    return partitioning.with_sharding(
        self.batch_shapes, {k: self.partitioner.data_sharding for k in self.batch_shapes}
    )

  def compile_train_step(self):
    """The train step compiled ahead of time for `batch_shapes` (cached).

    The compiled object also answers `memory_analysis()` (see `memory_report`).
    """
    if self._compiled_train_step is None:
      with self.partitioner.context():
        lowered = self._jitted_train_step.lower(self.abstract_state, self.abstract_batch())
      self._compiled_train_step = lowered.compile()
    return self._compiled_train_step

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update. `batch` holds global arrays sharded on `data`
    (`Partitioner.shard_batch`) shaped like `batch_shapes`; `state` is donated.

    Returns:
      (new state, metrics): scalars `loss`, `z_loss`, `cross_ent_loss`, `accuracy`,
      `num_tokens`, `learning_rate` (of this step), `grad_norm`, `routing/*`.
    """
    return self.compile_train_step()(state, batch)

  # -- Evaluation and prediction --------------------------------------------------------

  @functools.cached_property
  def _jitted_eval_step(self):
    def eval_step(params, batch):
      _, metrics = self.model.loss_fn(params, batch, None)
      return metrics

    return jax.jit(
        eval_step,
        in_shardings=(self.params_sharding, self.partitioner.data_sharding),
        out_shardings=self.partitioner.replicated,
    )

  def _call(self, name: str, jitted, params: PyTree, batch: Batch):
    """`jitted(params, batch)` under the mesh; with several processes, compiled first.

    Processes compile at different speeds (one finds the persistent cache, another does
    not); CPU collectives give up when a peer joins more than 30 s late. So each new
    batch shape is compiled ahead, and the processes meet at a barrier before running it.
    """
    with self.partitioner.context():
      if jax.process_count() == 1:
        return jitted(params, batch)
      key = (name, tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items())))
      if key not in self._compiled_steps:
        self._compiled_steps[key] = jitted.lower(params, batch).compile()
        partitioning.barrier(f"compiled_{name}")
      return self._compiled_steps[key](params, batch)

  def eval_step(self, params: PyTree, batch: Batch) -> dict[str, jax.Array]:
    """Teacher-forced metrics of one batch without dropout (`model.loss_fn`)."""
    return self._call("eval_step", self._jitted_eval_step, params, batch)

  @functools.cached_property
  def _jitted_predict_step(self):
    return jax.jit(
        lambda params, batch: self.model.predict_batch(params, batch),
        in_shardings=(self.params_sharding, self.partitioner.data_sharding),
        out_shardings=self.partitioner.replicated,
    )

  def predict_step(self, params: PyTree, batch: Batch) -> jax.Array:
    """Decoded ids [batch, target_length] (the model's `decode_fn`; greedy by default).

    `batch` needs `encoder_input_tokens` [batch, inputs] and `decoder_input_tokens`
    [batch, targets] (zeros: no prompt), sharded on `data`.
    """
    return self._call("predict_step", self._jitted_predict_step, params, batch)

  @functools.cached_property
  def _jitted_score_step(self):
    return jax.jit(
        lambda params, batch: self.model.score_batch(params, batch),
        in_shardings=(self.params_sharding, self.partitioner.data_sharding),
        out_shardings=self.partitioner.replicated,
    )

  def score_step(self, params: PyTree, batch: Batch) -> jax.Array:
    """Summed target log-likelihoods [batch] (`model.score_batch`)."""
    return self._call("score_step", self._jitted_score_step, params, batch)


def memory_report(compiled) -> dict[str, int]:
  """Bytes a compiled step needs on one device, from `compiled.memory_analysis()`.

  `peak_bytes_estimate` = arguments + outputs + temporaries - aliased (donated) bytes:
  what the step needs at its high-water mark beyond the runtime's own overhead.
  Returns {} where the backend does not report.
  """
  analysis = compiled.memory_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if analysis is None:
    return {}
  fields = (
      "argument_size_in_bytes",
      "output_size_in_bytes",
      "temp_size_in_bytes",
      "alias_size_in_bytes",
      "generated_code_size_in_bytes",
  )
  report = {name: int(getattr(analysis, name, 0) or 0) for name in fields}
  report["peak_bytes_estimate"] = (
      report["argument_size_in_bytes"]
      + report["output_size_in_bytes"]
      + report["temp_size_in_bytes"]
      - report["alias_size_in_bytes"]
  )
  return report


def device_memory_stats(device: jax.Device | None = None) -> dict[str, int]:
  """The allocator's counters of one device (`peak_bytes_in_use`, ...); {} on CPU."""
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() or {}
  return {k: int(v) for k, v in stats.items() if isinstance(v, (int, np.integer))}
