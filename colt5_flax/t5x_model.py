"""Our network under t5x's own trainer (`python -m t5x.train`, configs/t5x/).

t5x's `EncoderDecoderModel` drives any module with t5x's module contract, which
`network.EncoderDecoder` follows. Three things differ, and this subclass bridges them:

- Parameter axis names: our layers box parameters with `nn.with_logical_partitioning`
  (`LogicallyPartitioned`); t5x reads them from a `params_axes` collection (flax's older
  `param_with_axes`: `params_axes/<path>/<name>_axes` = `AxisMetadata(names)`), and its
  Adafactor refuses a model that emits none. `get_initial_variables` unboxes the
  parameters and writes their names there.
- Token dtypes at initialisation: t5x's dummy tokens are float32 unless the caller
  passes `input_types` (t5x.train does; t5x.eval does not); ours default to int32.
- The decoding cache: t5x creates it from dummy (all-ones) encoder inputs
  (`_compute_kv_cache`), but our cross-attention computes its keys and values once, when
  the cache is created. The cache is created here through `module.decode` with the real
  encoder outputs.

Importing this module needs t5x (installed from source; it is not on PyPI).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from flax import traverse_util
from flax.core import frozen_dict
from flax.linen import partitioning as flax_partitioning
from t5x import models

from colt5_flax import model as model_lib


class EncoderDecoderModel(models.EncoderDecoderModel):
  """t5x's `models.EncoderDecoderModel` for `network.EncoderDecoder` (same arguments)."""

  def get_initial_variables(self, rng, input_shapes, input_types=None):
    """t5x's initial variables: plain `params` plus their names in `params_axes`.

    Token features default to int32: t5x's default is float32 (flaxformer's embedder
    casts), which our `nn.Embed` refuses; `t5x.eval` and t5x's export pass no types.
    """
    input_types = {
        "encoder_input_tokens": jnp.int32,
        "decoder_input_tokens": jnp.int32,
        **(input_types or {}),
    }
    variables = frozen_dict.unfreeze(
        super().get_initial_variables(rng, input_shapes, input_types)
    )
    boxed = variables["params"]
    axes = {}
    for path, leaf in traverse_util.flatten_dict(boxed).items():
      if not isinstance(leaf, nn.LogicallyPartitioned):
        raise ValueError(f"parameter {'/'.join(path)} carries no logical axis names")
      axes[path[:-1] + (f"{path[-1]}_axes",)] = flax_partitioning.AxisMetadata(
          names=tuple(leaf.names)
      )
    variables["params"] = nn.meta.unbox(boxed)
    variables["params_axes"] = traverse_util.unflatten_dict(axes)
    return frozen_dict.freeze(variables)

  def _compute_kv_cache(
      self,
      params,
      encoded_inputs,
      encoder_input_tokens,
      decoder_input_tokens,
      prefill_decoder_prompt: bool = False,
  ):
    """The decoding cache, created from the real encoder outputs (see module docstring)."""
    if prefill_decoder_prompt:
      raise NotImplementedError("decoder prompts (prompt_with_targets) are not supported")
    cache = model_lib.create_decode_cache(
        self.module, params, encoded_inputs, encoder_input_tokens, decoder_input_tokens
    )
    return cache, None
