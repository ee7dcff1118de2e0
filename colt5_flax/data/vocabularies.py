"""Vocabularies: T5's SentencePiece model, any local `.model`, or bytes.

Gin binds these plain functions by dynamic registration, e.g.

    from __gin__ import dynamic_registration
    from colt5_flax.data import vocabularies
    VOCABULARY = @vocabularies.get_vocabulary()
    vocabularies.get_vocabulary.kind = 'sentencepiece'

Three kinds:
- `'sentencepiece'`: T5's 32k SentencePiece model. The default path is the public one T5X
  uses, `cc_all.32000.100extra`, whose 100 `<extra_id_N>` pieces are already inside the
  model file (32100 ids; models pad the embedding to 32128 rows, paper Table 7). So the
  default `extra_ids` is 0: adding 100 more would give 32200 ids. Pass `extra_ids=100`
  only with a model that lacks them (T5's older `cc_all.32000` file).
- `'byte'`: `seqio.ByteVocabulary` (ByT5: 0 pad, 1 EOS, 2 UNK, byte b -> id b + 3; 259
  ids). The tests and the demo use it: no file, and one token per byte, which the
  synthetic task needs for its exact relevance mask.
- any local or `gs://` `.model` file via `path` with kind `'sentencepiece'`.

Sentinels for span corruption come from `sentinel_ids`, not from these constructors.
"""

from __future__ import annotations

import re

import seqio
import tensorflow as tf

DEFAULT_SPM_PATH = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"
# The number of <extra_id_N> pieces T5's default model carries inside the file.
T5_NUM_SENTINELS = 100
VOCABULARY_KINDS = ("byte", "sentencepiece")

# ByT5's sentinels: the ids of bytes 0xFF, 0xFE, ... 0xF5, which never occur in valid
# UTF-8, so they cannot collide with text (Xue et al. 2022, ByT5 §3.1).
_BYTE_SENTINEL_COUNT = 0xFF - 0xF5 + 1
_EXTRA_ID_PIECE = re.compile(r"^▁?<extra_id_(\d+)>$")


class CheckedSentencePieceVocabulary(seqio.SentencePieceVocabulary):
  """`seqio.SentencePieceVocabulary` that names its file when the file is missing.

  seqio loads the model lazily on first use and then fails deep inside a tf.data
  pipeline with a bare NotFoundError; this subclass checks the path first (still lazily,
  so registering tasks never touches GCS) and raises FileNotFoundError with the path.
  """

  def _model_context(self):
    if self._model is None:
      _check_vocabulary_file(self.sentencepiece_model_file)
    return super()._model_context()


def _check_vocabulary_file(path: str) -> None:
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f"SentencePiece vocabulary file not found: {path!r} (set "
        "vocabularies.get_vocabulary.path to a local .model file, or use kind='byte')"
    )


def sentencepiece_vocabulary(
    path: str = DEFAULT_SPM_PATH, extra_ids: int = 0, *, check_exists: bool = True
) -> seqio.SentencePieceVocabulary:
  """A SentencePiece vocabulary read from `path` (local or gs://).

  Args:
    path: the `.model` file.
    extra_ids: extra sentinel ids seqio appends to the model; 0 for T5's default file,
      which already holds 100 (see the module docstring).
    check_exists: check now that the file exists (one tf.io.gfile stat). With False the
      check happens when the model is first loaded, which keeps task registration free
      of file-system calls.

  Returns:
    a `CheckedSentencePieceVocabulary`.
  """
  if extra_ids < 0:
    raise ValueError(f"extra_ids must be >= 0, got {extra_ids}")
  if check_exists:
    _check_vocabulary_file(path)
  return CheckedSentencePieceVocabulary(path, extra_ids=extra_ids)


def byte_vocabulary(extra_ids: int = 0) -> seqio.ByteVocabulary:
  """`seqio.ByteVocabulary`: 3 special ids + 256 bytes (+ `extra_ids` at the top)."""
  if extra_ids < 0:
    raise ValueError(f"extra_ids must be >= 0, got {extra_ids}")
  return seqio.ByteVocabulary(extra_ids=extra_ids)


def get_vocabulary(
    kind: str = "byte", path: str = DEFAULT_SPM_PATH, extra_ids: int = 0
) -> seqio.Vocabulary:
  """The vocabulary named by `kind` ('byte' or 'sentencepiece').

  Args:
    kind: 'byte' (default: tests and the demo) or 'sentencepiece'.
    path: the SentencePiece model for kind 'sentencepiece'; ignored for 'byte'.
    extra_ids: extra ids seqio appends at the top of the vocabulary.

  Returns:
    a seqio vocabulary. For 'sentencepiece' the file must exist (FileNotFoundError
    naming the path otherwise).
  """
  if kind == "byte":
    return byte_vocabulary(extra_ids)
  if kind == "sentencepiece":
    return sentencepiece_vocabulary(path, extra_ids)
  raise ValueError(f"Unknown vocabulary kind {kind!r}; expected one of {VOCABULARY_KINDS}")


def encdec_output_features(
    vocabulary: seqio.Vocabulary | None = None,
) -> dict[str, seqio.Feature]:
  """A text-to-text task's `inputs` and `targets` features, both with EOS.

  Args:
    vocabulary: of both features; None: T5's SentencePiece model, not read until used
      (registering a task reads no file).
  """
  vocabulary = vocabulary or sentencepiece_vocabulary(check_exists=False)
  return {
      "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
      "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
  }


def sentinel_ids(vocabulary: seqio.Vocabulary) -> list[int]:
  """The span-corruption sentinel ids, `<extra_id_0>` first.

  T5's convention: sentinel i is `vocab_size - 1 - i` (the top of the vocabulary). How
  many exist depends on the vocabulary:
  - `extra_ids > 0`: that many (seqio appends them at the top, reversed).
  - SentencePiece without seqio extra ids: the `<extra_id_N>` pieces the model file holds
    at its top (100 for T5's default model).
  - ByteVocabulary without extra ids: ByT5's convention, the 11 ids of bytes 0xFF..0xF5,
    which never occur in valid UTF-8.

  Returns:
    a list of ids `[num_sentinels]`, descending.
  """
  vocab_size = vocabulary.vocab_size
  if vocabulary.extra_ids > 0:
    count = vocabulary.extra_ids
  elif isinstance(vocabulary, seqio.SentencePieceVocabulary):
    tokenizer = vocabulary.tokenizer
    count = 0
    while count < vocab_size and _EXTRA_ID_PIECE.match(
        tokenizer.id_to_piece(vocab_size - 1 - count)
    ):
      count += 1
  elif isinstance(vocabulary, seqio.ByteVocabulary):
    count = _BYTE_SENTINEL_COUNT
  else:
    count = 0
  if count == 0:
    raise ValueError(
        f"{type(vocabulary).__name__} has no sentinel ids; build it with extra_ids > 0"
    )
  return [vocab_size - 1 - i for i in range(count)]
