r"""Converts a local transformers T5 / LongT5 checkpoint into an orbax checkpoint of our params.

  python scripts/convert_hf_checkpoint.py \
    --hf_dir=/path/to/long-t5-tglobal-base --output_dir=/tmp/longt5_tglobal_base \
    [--dtype=float32] [--vocabulary=/path/to/spiece.model] > longt5_tglobal_base.gin

--hf_dir is a directory written by `save_pretrained` (config.json plus model.safetensors,
sharded safetensors, or pytorch_model.bin). It is read with `local_files_only=True`: nothing
is downloaded. Weights are read with safetensors when present, otherwise with
`torch.load(weights_only=True)`; no pickled code is ever run.

Output layout: `--output_dir` is one orbax `StandardCheckpointer` checkpoint (StandardSave)
of the parameter tree alone, `{"token_embedder": ..., "encoder": ..., "decoder": ...,
["logits_dense": ...]}`, exactly `nn.unbox(variables["params"])` of `convert.hf.from_hf`
(plain arrays in `--dtype`; no optimizer state, no step). It is what
`colt5_flax.checkpoints.restore_params` reads as a parameter-tree checkpoint, so it can be a
run's `INITIAL_CHECKPOINT_PATH` (fine-tuning from the converted weights) or the checkpoint
of an evaluation; `ocp.StandardCheckpointer().restore(output_dir)` reads it too. A float32
restore target casts bfloat16-stored params back. The directory must not exist.

Standard output: a model gin file for the converted network, in the style of
configs/models/*.gin: it includes the project's architecture file for the encoder kind
(configs/architectures/{t5_1_1,longt5_local,longt5_tglobal}.gin) and sets the size macros,
multi-head cross-attention, `SCAN_LAYERS = False` (the params are stored per layer) and
whatever the architecture leaves at a default the checkpoint does not share (tied T5 v1.0
output layer, relative buckets). It names the vocabulary the checkpoint needs
(`VOCABULARY`): `--vocabulary` (a SentencePiece model, or 'byte'); else the `spiece.model`
saved beside the weights; else, for the 32128 embedding rows of T5 and LongT5, T5's public
SentencePiece model; any other checkpoint needs `--vocabulary`. Save it as e.g.
configs/models/my_longt5.gin and train with `--gin_file=models/my_longt5.gin
--gin.INITIAL_CHECKPOINT_PATH="'<output_dir>'"`.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import app, flags, logging

from colt5_flax.convert import hf, hf_architecture
from colt5_flax.data import vocabularies

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Local transformers checkpoint directory.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Orbax checkpoint directory to create (must not exist)."
)
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "Dtype of the stored parameters."
)
_VOCABULARY = flags.DEFINE_string(
    "vocabulary", None,
    "The checkpoint's vocabulary: a SentencePiece model file, or 'byte'. Default: "
    "<hf_dir>/spiece.model, else T5's public model for 32128-row embeddings.",
)

_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def load_hf_model(hf_dir: str):
  """Loads `T5ForConditionalGeneration` / `LongT5ForConditionalGeneration` from a local dir.

  Raises:
    FileNotFoundError: no directory, config.json or weights file.
    ValueError: a model type other than t5 / longt5.
  """
  import transformers  # Only this script needs transformers (and torch).

  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(f"--hf_dir={hf_dir!r} is not a directory")
  if not os.path.exists(os.path.join(hf_dir, "config.json")):
    raise FileNotFoundError(f"{os.path.join(hf_dir, 'config.json')} does not exist")
  files = set(os.listdir(hf_dir))
  use_safetensors = bool(files & set(_SAFETENSORS))
  if not use_safetensors and not files & set(_PICKLED):
    raise FileNotFoundError(
        f"{hf_dir} holds none of {_SAFETENSORS + _PICKLED}; files: {sorted(files)}"
    )
  if use_safetensors:
    _check_safetensors(hf_dir, files)
  config = transformers.AutoConfig.from_pretrained(hf_dir, local_files_only=True)
  classes = {
      "t5": transformers.T5ForConditionalGeneration,
      "longt5": transformers.LongT5ForConditionalGeneration,
  }
  if config.model_type not in classes:
    raise ValueError(
        f"{hf_dir}/config.json has model_type={config.model_type!r}; expected 't5' or 'longt5'"
    )
  model = classes[config.model_type].from_pretrained(
      hf_dir,
      config=config,
      local_files_only=True,
      use_safetensors=use_safetensors,
      # pytorch_model.bin is a pickle: only tensors may come out of it.
      weights_only=True,
  )
  return model.eval()


def _check_safetensors(hf_dir: str, files: set[str]) -> None:
  """Opens every safetensors file of `hf_dir` and reads each tensor's header.

  transformers' error for a truncated or corrupted file does not name the file.

  Raises:
    ValueError: naming the file that cannot be read (or the index's missing shard).
  """
  import json

  from safetensors import safe_open

  if "model.safetensors" in files:
    names = ["model.safetensors"]
  else:
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    with open(index) as f:
      names = sorted(set(json.load(f).get("weight_map", {}).values()))
  for name in names:
    path = os.path.join(hf_dir, name)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} (listed in model.safetensors.index.json) does not exist")
    try:
      with safe_open(path, framework="np") as weights:
        for key in weights.keys():
          weights.get_slice(key)
    except Exception as error:  # noqa: BLE001 -- safetensors raises its own SafetensorError
      raise ValueError(
          f"Cannot read {path}: {type(error).__name__}: {error} (a truncated or partial "
          "download? save_pretrained or download it again)"
      ) from error


# T5's SentencePiece model (32000 pieces + 100 extra ids), padded to 32128 embedding rows.
_T5_VOCABULARY_ROWS = 32128


def checkpoint_vocabulary(hf_dir: str, vocab_size: int, vocabulary: str | None = None) -> str:
  """The vocabulary the checkpoint in `hf_dir` needs: a SentencePiece model path or 'byte'.

  `vocabulary` when given; else the tokenizer's `spiece.model` saved beside the weights;
  else T5's public SentencePiece model when the embedding has T5's 32128 rows.

  Raises:
    ValueError: none of these applies (the caller must name the vocabulary).
  """
  if vocabulary:
    return vocabulary
  saved = os.path.join(hf_dir, "spiece.model")
  if os.path.exists(saved):
    return os.path.abspath(saved)
  if vocab_size == _T5_VOCABULARY_ROWS:
    return vocabularies.DEFAULT_SPM_PATH
  raise ValueError(
      f"{hf_dir} has no spiece.model and its embedding has {vocab_size} rows, not T5's "
      f"{_T5_VOCABULARY_ROWS}: name its vocabulary with --vocabulary=<SentencePiece model> "
      "(or --vocabulary=byte)"
  )


def convert_checkpoint(
    hf_dir: str, output_dir: str, dtype: str = "float32", vocabulary: str | None = None
) -> str:
  """Converts `hf_dir` and writes the params to `output_dir`; returns the model gin file.

  Args:
    hf_dir, output_dir, dtype: as the flags.
    vocabulary: `--vocabulary` (see `checkpoint_vocabulary`).
  """
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype={dtype!r}; expected 'float32' or 'bfloat16'")
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir):
    raise ValueError(f"--output_dir={output_dir!r} exists; choose a new directory")
  model = load_hf_model(hf_dir)
  arch = hf_architecture.architecture_from_hf(model)
  vocabulary = checkpoint_vocabulary(hf_dir, arch.vocab_size, vocabulary)
  _, variables = hf.from_hf(model)
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), nn.unbox(variables["params"]))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(output_dir, params)
  checkpointer.wait_until_finished()
  num_params = sum(x.size for x in jax.tree.leaves(params))
  logging.info("wrote %d parameters (%s) to %s", num_params, dtype, output_dir)
  header = (
      f"# Converted by scripts/convert_hf_checkpoint.py from {os.path.abspath(hf_dir)}\n"
      f"# ({type(model).__name__}, {num_params} parameters); params: {output_dir}\n"
  )
  return header + hf_architecture.gin_bindings(arch, vocabulary)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _HF_DIR.value or not _OUTPUT_DIR.value:
    raise app.UsageError("--hf_dir and --output_dir are required")
  gin_text = convert_checkpoint(
      _HF_DIR.value, _OUTPUT_DIR.value, _DTYPE.value, _VOCABULARY.value
  )
  print(gin_text, end="")


if __name__ == "__main__":
  app.run(main)
