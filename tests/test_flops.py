"""colt5_flax.flops at the paper's Base width, against sums written out by hand here.

The sizes are read from configs/models/*_base.gin (model_files), so this also checks that
the model files give the counted sizes (paper Table 7): d_model 768, head dim 64, 12 T5
heads and d_ff 2048; CoLT5 4 light and 8 heavy heads, light MLP 1024, heavy 8192; local
radius 127 (blocks of 128 see 384 keys), global blocks of 16; m = n/16, 2m keys/values.
"""

import pytest

from colt5_flax import flops, model_files


def _dims(kind):
  with model_files.parsed([model_files.model_file(kind, "base")]):
    return flops.EncoderDims.from_gin(kind)


@pytest.fixture(scope="module")
def base():
  return {kind: _dims(kind) for kind in flops.KINDS}


def test_base_sizes_come_from_the_model_files(base):
  colt5 = base["colt5"]
  assert (colt5.embed_dim, colt5.head_dim, colt5.num_layers) == (768, 64, 12)
  assert (colt5.num_light_heads, colt5.num_heavy_heads) == (4, 8)
  assert (colt5.light_mlp_dim, colt5.heavy_mlp_dim, colt5.local_radius) == (1024, 8192, 127)
  assert colt5.routed_counts(16384) == {"queries": 1024, "key_values": 2048, "feedforward": 1024}
  # Beyond 32k tokens m stays at its 32k value.
  assert colt5.routed_counts(65536) == {"queries": 2048, "key_values": 4096, "feedforward": 2048}
  assert (base["longt5_tglobal"].global_block_size, base["t5"].num_heads) == (16, 12)


def test_layer_flops_by_hand(base):
  n, d, inner, ff = 4096, 768, 768, 2048
  projections = 4 * 2 * n * d * inner
  mlp = 3 * 2 * n * d * ff
  assert sum(flops.layer_flops(base["t5"], n).values()) == (
      projections + 2 * 2 * n * n * inner + mlp
  )
  assert sum(flops.layer_flops(base["longt5_local"], n).values()) == (
      projections + 2 * 2 * n * 384 * inner + mlp
  )
  g = n // 16
  assert sum(flops.layer_flops(base["longt5_tglobal"], n).values()) == (
      projections + 2 * 2 * g * d * inner + 2 * 2 * n * (384 + g) * inner + mlp
  )
  m, kv = 256, 512
  light, heavy = 4 * 64, 8 * 64
  assert flops.layer_flops(base["colt5"], n) == {
      "light_attention": 4 * 2 * n * d * light + 2 * 2 * n * 384 * light,
      "light_mlp": 3 * 2 * n * d * 1024,
      "routers": 3 * 2 * n * d,
      "heavy_attention": 2 * 2 * m * d * heavy + 2 * 2 * kv * d * heavy + 2 * 2 * m * kv * heavy,
      "heavy_mlp": 3 * 2 * m * d * 8192,
  }


@pytest.mark.parametrize("length, ratio", [(4096, 1.7), (16384, 1.9)])
def test_tglobal_over_colt5_ratio_quoted_in_the_readme(base, length, ratio):
  tglobal = sum(flops.layer_flops(base["longt5_tglobal"], length).values())
  colt5 = sum(flops.layer_flops(base["colt5"], length).values())
  assert round(tglobal / colt5, 1) == ratio


def test_unknown_kind_is_named():
  with pytest.raises(ValueError, match="Unknown encoder kind 'longt5'"):
    model_files.model_file("longt5", "base")
