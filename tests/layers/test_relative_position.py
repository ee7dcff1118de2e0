"""T5 relative position buckets against mesh-tensorflow's formula and transformers' T5."""

import numpy as np
import pytest

from colt5_flax.layers import relative_position as rp
from tests.reference import t5_bucket as _mtf_relative_position_bucket


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64)])
def test_bucket_matches_mesh_tensorflow(bidirectional, num_buckets, max_distance):
  relative = np.arange(-1000, 1001)
  got = rp.relative_position_bucket(
      relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
  )
  expected = _mtf_relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
  np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_bucket_matches_transformers(bidirectional):
  torch = pytest.importorskip("torch")
  from transformers.models.t5.modeling_t5 import T5Attention

  relative = np.arange(-3000, 3001)
  expected = T5Attention._relative_position_bucket(
      torch.from_numpy(relative), bidirectional=bidirectional, num_buckets=32, max_distance=128
  ).numpy()
  got = rp.relative_position_bucket(relative, bidirectional=bidirectional)
  np.testing.assert_array_equal(np.asarray(got), expected)


def test_bias_lookup_by_hand():
  table = np.arange(2 * 32, dtype=np.float32).reshape(2, 32)
  query_positions = np.array([[0, 1, 2]])
  key_positions = np.array([[0, 5, 200]])
  relative = rp.relative_positions(query_positions, key_positions)  # [1, 3, 3]
  np.testing.assert_array_equal(np.asarray(relative)[0], [[0, 5, 200], [-1, 4, 199], [-2, 3, 198]])
  bias = rp.bias_from_embedding(
      table, relative, bidirectional=True, num_buckets=32, max_distance=128
  )
  assert bias.shape == (1, 2, 3, 3)
  # Bidirectional: offset 0 -> bucket 0, +5 -> 16 + 5, -1 -> 1, -2 -> 2, +4 -> 20, +3 -> 19,
  # +200/+199/+198 beyond max_distance -> last bucket 31.
  expected_buckets = np.array([[0, 21, 31], [1, 20, 31], [2, 19, 31]])
  np.testing.assert_array_equal(np.asarray(bias)[0, 0], expected_buckets)
  np.testing.assert_array_equal(np.asarray(bias)[0, 1], expected_buckets + 32)


def test_bias_from_embedding_rejects_wrong_table():
  with pytest.raises(ValueError, match="16 buckets"):
    rp.bias_from_embedding(
        np.zeros((2, 16)), np.zeros((1, 1)), bidirectional=True, num_buckets=32, max_distance=128
    )


@pytest.mark.parametrize("max_distance", [16, 64])
def test_tables_bias_uses_the_stacks_bucketing(max_distance):
  # A stack's tables carry its bucketing: the lookup must follow its max_distance.
  rng = np.random.default_rng(0)
  local, side = rng.normal(size=(2, 2, 8)).astype(np.float32)
  tables = rp.RelativePositionTables(
      {"relpos_bias": local, "global_relpos_bias": side}, num_buckets=8,
      max_distance=max_distance,
  )
  relative = np.arange(-40, 41)[None, :]  # [q = 1, k = 81]
  buckets = _mtf_relative_position_bucket(relative, True, 8, max_distance)
  np.testing.assert_array_equal(np.asarray(tables.bias("relpos_bias", 2, relative)),
                                local[:, buckets])
  np.testing.assert_array_equal(np.asarray(tables.bias("global_relpos_bias", 2, relative)),
                                side[:, buckets])
  assert tables.bias("heavy_relpos_bias", 2, relative) is None  # no such table: no bias
  with pytest.raises(ValueError, match=r"'relpos_bias' has shape \(2, 8\).*\(3, 8\)"):
    tables.table("relpos_bias", 3)
