"""Vocabularies: kinds, missing files, sentinels."""

import pytest
import sentencepiece as spm
import seqio
from sentencepiece import sentencepiece_model_pb2

from colt5_flax.data import vocabularies


@pytest.fixture(scope="module")
def tiny_spm_path(tmp_path_factory):
  """A 60-piece SentencePiece model with T5's ids (0 pad, 1 EOS, 2 UNK) and, like T5's
  `cc_all.32000.100extra` file, three `<extra_id_N>` pieces appended at the top."""
  folder = tmp_path_factory.mktemp("spm")
  corpus = folder / "corpus.txt"
  corpus.write_text("\n".join(["the cat sat on the mat", "a dog ate the bone"] * 50))
  spm.SentencePieceTrainer.train(
      input=str(corpus),
      model_prefix=str(folder / "base"),
      vocab_size=40,
      pad_id=0,
      eos_id=1,
      unk_id=2,
      bos_id=-1,
      model_type="unigram",
      hard_vocab_limit=False,
      minloglevel=2,
  )
  model = sentencepiece_model_pb2.ModelProto.FromString((folder / "base.model").read_bytes())
  for i in reversed(range(3)):
    model.pieces.add(
        piece=f"▁<extra_id_{i}>",
        score=0.0,
        type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED,
    )
  path = folder / "with_extra.model"
  path.write_bytes(model.SerializeToString())
  return str(path)


def test_byte_vocabulary_is_the_default():
  vocabulary = vocabularies.get_vocabulary()
  assert isinstance(vocabulary, seqio.ByteVocabulary)
  assert vocabulary.vocab_size == 3 + 256
  assert vocabulary.encode("ab") == [ord("a") + 3, ord("b") + 3]
  assert vocabularies.get_vocabulary("byte", extra_ids=100).vocab_size == 359


def test_local_sentencepiece_model(tiny_spm_path):
  vocabulary = vocabularies.get_vocabulary("sentencepiece", path=tiny_spm_path)
  ids = vocabulary.encode("the cat sat")
  assert vocabulary.decode(ids) == "the cat sat"
  assert vocabulary.eos_id == 1
  # The three <extra_id_N> pieces are found at the top, <extra_id_0> highest.
  top = vocabulary.vocab_size - 1
  assert vocabularies.sentinel_ids(vocabulary) == [top, top - 1, top - 2]
  assert vocabulary.tokenizer.id_to_piece(top) == "▁<extra_id_0>"


def test_missing_sentencepiece_file_names_the_path(tmp_path):
  missing = str(tmp_path / "nope" / "spm.model")
  with pytest.raises(FileNotFoundError, match="nope/spm.model"):
    vocabularies.get_vocabulary("sentencepiece", path=missing)
  # Lazily checked vocabularies (what task registration uses) fail at first use instead.
  lazy = vocabularies.sentencepiece_vocabulary(missing, check_exists=False)
  with pytest.raises(FileNotFoundError, match="nope/spm.model"):
    lazy.encode("x")


def test_default_path_is_t5s_public_model():
  assert vocabularies.DEFAULT_SPM_PATH == (
      "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"
  )


def test_unknown_kind():
  with pytest.raises(ValueError, match="'bpe'"):
    vocabularies.get_vocabulary("bpe")


def test_sentinels_of_byte_vocabularies():
  with_extra = vocabularies.get_vocabulary("byte", extra_ids=100)
  assert vocabularies.sentinel_ids(with_extra) == list(range(358, 258, -1))
  # Without extra ids: ByT5's ids of the bytes 0xFF..0xF5, which UTF-8 never produces.
  plain = vocabularies.get_vocabulary("byte")
  sentinels = vocabularies.sentinel_ids(plain)
  assert sentinels == [0xFF + 3 - i for i in range(11)]
  text = "".join(chr(c) for c in range(1, 0x3000, 7)) + "\U0001f600 ünïcödé"
  assert not set(plain.encode(text)) & set(sentinels)
