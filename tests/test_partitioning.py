"""Mesh, logical axis rules and shardings; a step on a (4, 2) mesh equals one on one device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from colt5_flax import partitioning
from tests import trainer_fixtures


def test_standard_rules_map_t5x_names_to_the_mesh():
  rules = partitioning.standard_logical_axis_rules()
  expected = {
      "batch": "data", "vocab": "model", "mlp": "model", "heads": "model",
      "joined_kv": "model", "embed": None, "kv": None, "kv_heads": None, "length": None,
      "relpos_buckets": None, "layers": None,
  }
  for name, mesh_axis in expected.items():
    assert nn.logical_to_mesh_axes((name,), rules) == P(mesh_axis), name


def test_mesh_shape_is_data_by_model():
  mesh = partitioning.create_mesh(num_partitions=2)
  assert mesh.axis_names == ("data", "model")
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  assert partitioning.Partitioner(num_partitions=8).data_parallel_size == 1


def test_num_partitions_must_divide_the_devices():
  with pytest.raises(ValueError, match="NUM_PARTITIONS=3 does not divide the 8 devices"):
    partitioning.create_mesh(num_partitions=3)


def test_batch_size_must_divide_over_data():
  partitioner = partitioning.Partitioner(num_partitions=2)
  partitioner.check_batch_size(12)
  with pytest.raises(ValueError, match=r"BATCH_SIZE=6 is not divisible by the data-parallel"):
    partitioner.check_batch_size(6)


def test_indivisible_parameter_is_named():
  partitioner = partitioning.Partitioner(num_partitions=4)
  tree = {"attention": {"query": jax.ShapeDtypeStruct((32, 2, 8), jnp.float32)}}
  shardings = {"attention": {"query": partitioner.logical_to_sharding(P("embed", "heads", "kv"))}}
  with pytest.raises(ValueError, match=r"query of shape \(32, 2, 8\) cannot be split 4 ways"):
    partitioning.check_divisible(tree, shardings)


def test_optimizer_states_follow_their_parameters():
  partitioner = partitioning.Partitioner(num_partitions=2)
  params = {
      "mlp": {"wi": jax.ShapeDtypeStruct((256, 512), jnp.float32)},  # factored by Adafactor
      "norm": {"scale": jax.ShapeDtypeStruct((256,), jnp.float32)},
      "tiny": jax.ShapeDtypeStruct((16, 64), jnp.float32),  # too small to factor
  }
  shardings = {
      "mlp": {"wi": partitioner.logical_to_sharding(P("embed", "mlp"))},
      "norm": {"scale": partitioner.logical_to_sharding(P("embed"))},
      "tiny": partitioner.logical_to_sharding(P("embed", "mlp")),
  }
  mesh = partitioner.mesh

  adafactor_state = jax.eval_shape(optax.adafactor(0.01).init, params)
  specs = jax.tree.map(
      lambda s: s.spec,
      partitioning.derived_sharding(adafactor_state, params, shardings, mesh),
  )
  factored = specs[0]
  # v_row keeps the rows [256] (mlp axis reduced), v_col the columns [512] on `model`.
  assert factored.v_row["mlp"]["wi"] == P(None)
  assert factored.v_col["mlp"]["wi"] == P("model")
  assert factored.v["tiny"] == P(None, "model")  # unfactored: the parameter's own spec
  assert factored.v_row["tiny"] == P()  # a (1,) placeholder: replicated
  assert factored.count == P()

  adam_state = jax.eval_shape(optax.adam(0.01).init, params)
  adam_specs = jax.tree.map(
      lambda s: s.spec, partitioning.derived_sharding(adam_state, params, shardings, mesh)
  )
  assert adam_specs[0].mu["mlp"]["wi"] == P(None, "model")
  assert adam_specs[0].nu["tiny"] == P(None, "model")


def test_shard_batch_splits_rows_over_data():
  partitioner = partitioning.Partitioner(num_partitions=2)
  rows = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
  sharded = partitioner.shard_batch({"encoder_input_tokens": rows})["encoder_input_tokens"]
  np.testing.assert_array_equal(np.asarray(sharded), rows)
  assert sharded.sharding.spec == P("data")
  for shard in sharded.addressable_shards:
    data_index = partitioner.mesh.devices.tolist().index(
        next(r for r in partitioner.mesh.devices.tolist() if shard.device in r)
    )
    np.testing.assert_array_equal(shard.data, rows[2 * data_index : 2 * data_index + 2])
  again = partitioner.shard_global_batch({"x": rows})["x"]
  np.testing.assert_array_equal(np.asarray(again), rows)


@pytest.mark.slow
def test_step_on_4x2_mesh_equals_step_on_one_device():
  reference = trainer_fixtures.tiny_trainer(None)
  on_mesh = trainer_fixtures.tiny_trainer(2)
  host_state = trainer_fixtures.initial_host_state()
  batch = trainer_fixtures.random_batch(0, 8)

  state_1, metrics_1 = reference.train_step(
      jax.device_put(host_state, reference.state_sharding), reference.partitioner.shard_batch(batch)
  )
  state_m, metrics_m = on_mesh.train_step(
      jax.device_put(host_state, on_mesh.state_sharding), on_mesh.partitioner.shard_batch(batch)
  )
  # The mesh really splits the work: vocabulary and MLP on `model`.
  assert state_m.params["logits_dense"]["kernel"].sharding.spec == P(None, "model")
  assert state_m.params["encoder"]["layers_0"]["mlp"]["wi_0"].sharding.spec == P(None, "model")
  # Same arithmetic up to float32 reassociation of the sharded sums.
  trainer_fixtures.assert_same_step(
      metrics_m, metrics_1, (state_m.params, state_m.opt_state),
      (state_1.params, state_1.opt_state),
  )
  assert int(state_m.step) == int(state_1.step) == 1
  # The step moved the parameters: the comparison is not of two unchanged copies.
  before = host_state.params["logits_dense"]["kernel"]
  assert np.abs(np.asarray(state_m.params["logits_dense"]["kernel"]) - before).max() > 1e-4


def test_steps_trace_with_activation_constraints():
  from colt5_flax import optimizers
  from colt5_flax import trainer as trainer_lib

  schedule = optimizers.constant_schedule(0.01)
  trainer = trainer_lib.Trainer(
      trainer_fixtures.tiny_model(),
      partitioning.Partitioner(num_partitions=2, constrain_activations=True),
      optimizers.adafactor(schedule),
      schedule,
      trainer_lib.encdec_batch_shapes(8, {"inputs": 64, "targets": 8}),
  )
  with trainer.partitioner.context():
    jax.eval_shape(trainer._train_step, trainer.abstract_state, trainer.abstract_batch())


def test_microbatched_step_lowers_on_the_mesh():
  # The microbatch constraint [2, 4, ...] on (None, 'data') must be valid on a real mesh
  # (the numerical check of microbatching runs on one device, in test_trainer.py).
  trainer = trainer_fixtures.tiny_trainer(2, num_microbatches=2)
  with trainer.partitioner.context():
    lowered = trainer._jitted_train_step.lower(trainer.abstract_state, trainer.abstract_batch())
  # The constraint is in the program (Shardy): microbatch rows on `data`.
  text = lowered.as_text()
  assert 'sharding_constraint' in text and '[{}, {"data"}, {}]> : tensor<2x4x64xi32>' in text
