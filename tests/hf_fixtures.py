"""The tiny transformers T5 / LongT5 of the tests against transformers.

tests/convert/test_hf.py (logits, conversion) and tests/test_training_parity.py (20 training
steps) build their random reference models from this one configuration. Sizes are chosen so
nothing divides evenly: 3 heads of 4, d_ff 24, local radius 2 (blocks of 3) and global
blocks of 4; few relative-position buckets and a short max distance, so that inputs of ~19
tokens reach the log buckets. Each test module sets its own vocabulary and decoder depth.
"""

LOCAL_RADIUS, GLOBAL_BLOCK = 2, 4
SIZES = dict(
    d_model=16,
    d_kv=4,
    d_ff=24,
    num_layers=2,
    num_heads=3,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
)


def config(kind: str, **fields):
  """transformers' config of the tiny model.

  Args:
    kind: "t5" (`T5Config`) or a LongT5 `encoder_attention_type` ("local",
      "transient-global"; `LongT5Config` with LOCAL_RADIUS and GLOBAL_BLOCK).
    **fields: config fields on top of SIZES (vocab_size, num_decoder_layers,
      tie_word_embeddings, ...), replacing SIZES' where both name one.
  """
  import transformers

  fields = {**SIZES, **fields}
  if kind == "t5":
    return transformers.T5Config(**fields)
  return transformers.LongT5Config(
      **{
          "encoder_attention_type": kind,
          "local_radius": LOCAL_RADIUS,
          "global_block_size": GLOBAL_BLOCK,
          **fields,
      }
  )
