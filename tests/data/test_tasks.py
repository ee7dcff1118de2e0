"""The registry: names, unknown names, idempotent registration, no file access."""

import importlib

import pytest
import seqio

from colt5_flax.data import scrolls_table, tasks, vocabularies

EXPECTED = (
    ["synthetic_kv_retrieval", "ul2_c4", "pegasus_c4", "scrolls", "scrolls_byte", "scrolls_local"]
    + [f"scrolls_{t}" for t in scrolls_table.NAMES]
    + [f"scrolls_{t}_byte" for t in scrolls_table.NAMES]
    + [f"scrolls_{t}_local" for t in scrolls_table.NAMES]
    + [f"scrolls_{t}_local_byte" for t in scrolls_table.NAMES]
    + [f"synthetic_kv_retrieval_{n}" for n in (1024, 2048, 4096, 8192, 16384, 32768, 65536)]
)


def test_default_tasks_are_registered():
  for name in EXPECTED:
    assert tasks.get_task(name).name == name
  assert set(EXPECTED) <= set(tasks.default_task_names())
  assert isinstance(tasks.get_task("scrolls"), seqio.Mixture)
  assert len(tasks.get_task("scrolls").tasks) == 7


def test_unknown_task_lists_the_registered_ones():
  with pytest.raises(ValueError, match="Unknown task or mixture 'scrols_qasper'") as error:
    tasks.get_task("scrols_qasper")
  assert "scrolls_qasper" in str(error.value)
  assert "synthetic_kv_retrieval" in str(error.value)


def test_import_twice_does_not_raise():
  importlib.reload(tasks)
  importlib.reload(tasks)
  assert "scrolls_qasper_local" in tasks.registered_task_names()


def test_registration_reads_no_vocabulary_file():
  vocabulary = tasks.get_task("scrolls_gov_report").output_features["inputs"].vocabulary
  assert isinstance(vocabulary, vocabularies.CheckedSentencePieceVocabulary)
  assert vocabulary.sentencepiece_model_file == vocabularies.DEFAULT_SPM_PATH
  assert vocabulary._model is None  # not loaded: nothing touched GCS
  byte_task = tasks.get_task("scrolls_gov_report_byte")
  assert isinstance(byte_task.output_features["targets"].vocabulary, seqio.ByteVocabulary)
