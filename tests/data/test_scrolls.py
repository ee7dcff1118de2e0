"""SCROLLS tasks on small official-format fixtures: local JSONL, zip, and a TFDS build."""

import json
import logging
import re
import zipfile

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from colt5_flax.data import scrolls, scrolls_files, scrolls_table, tasks, vocabularies

tfds.disable_progress_bar()

BYTES = vocabularies.get_vocabulary("byte")
WITH_IDS = tasks.EncDecFeatureConverterWithPassthrough(
    {"id": seqio.FeatureConverter.FeatureSpec(dtype=tf.string, rank=0)}
)

# Rows as in the released files: one per (example, reference); rows of an id need not be
# adjacent; test outputs are null.
QASPER = {
    "train": [
        {"id": "t1", "pid": "t1_0", "input": "Is it? Doc one.", "output": "yes"},
        {"id": "t1", "pid": "t1_1", "input": "Is it? Doc one.", "output": "Yes, it is."},
        {"id": "t2", "pid": "t2_0", "input": "Who? Doc two.", "output": "Bob"},
        {"id": "t3", "pid": "t3_0", "input": "What? Doc three.", "output": ""},
    ],
    "validation": [
        {"id": "v1", "pid": "v1_0", "input": "Is it? A long document.", "output": "yes"},
        {"id": "v2", "pid": "v2_0", "input": "Who wrote it? Other doc.", "output": "Alice"},
        {"id": "v1", "pid": "v1_1", "input": "Is it? A long document.", "output": "It is."},
        {"id": "v3", "pid": "v3_0", "input": "Why? Doc.", "output": "  "},
        {"id": "v4", "pid": "v4_0", "input": "", "output": "nothing"},
        {"id": "v2", "pid": "v2_1", "input": "Who wrote it? Other doc.", "output": "alice"},
    ],
    "test": [
        {"id": "s1", "pid": "s1_0", "input": "Where? Test doc.", "output": None},
        {"id": "s2", "pid": "s2_0", "input": "When? Test doc two.", "output": None},
    ],
}


def official_lines(rows):
  return "".join(json.dumps(row) + "\n" for row in rows)


def write_folder(root, config, splits):
  (root / config).mkdir(parents=True, exist_ok=True)
  for split, rows in splits.items():
    (root / config / f"{split}.jsonl").write_text(official_lines(rows))


def write_zip(root, config, splits):
  root.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(root / f"{config}.zip", "w") as zf:
    for split, rows in splits.items():
      zf.writestr(f"{config}/{split}.jsonl", official_lines(rows))


def decode(ids):
  return BYTES.decode([int(i) for i in ids])


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("scrolls_local")
  write_folder(root, "qasper", QASPER)
  write_zip(root, "quality", QASPER)
  return root


@pytest.fixture(scope="module")
def local_task_names(local_dir):
  return scrolls.register_scrolls_local_tasks(str(local_dir), BYTES, name_suffix="_fixture")


def converted(name, split, lengths):
  ds = seqio.get_dataset(name, lengths, WITH_IDS, dataset_split=split, shuffle=False)
  return list(ds.as_numpy_iterator())


def raw(name, split, lengths=None):
  task = seqio.get_mixture_or_task(name)
  return list(task.get_dataset(lengths, split=split, shuffle=False).as_numpy_iterator())


def test_local_validation_groups_references_by_id(local_dir, local_task_names, caplog):
  name = "scrolls_qasper_local_fixture"
  assert name in local_task_names
  lengths = {"inputs": 64, "targets": 16}
  with caplog.at_level(logging.WARNING):
    batch = converted(name, "validation", lengths)
  # v3 (blank output) and v4 (empty input) are skipped, counted and logged.
  assert [ex["id"] for ex in batch] == [b"v1", b"v2"]
  assert decode(batch[0]["encoder_input_tokens"]) == "Is it? A long document."
  assert decode(batch[0]["decoder_target_tokens"]) == "yes"
  assert decode(batch[1]["decoder_target_tokens"]) == "Alice"
  # Padded to the lengths, EOS after the text.
  assert batch[0]["encoder_input_tokens"].shape == (64,)
  assert batch[0]["encoder_input_tokens"][len("Is it? A long document.")] == BYTES.eos_id
  # By hand: 6 rows; v3's output and v4's input are empty; ids v1 and v2 remain.
  assert scrolls.row_counts(str(local_dir), "qasper", "validation") == {
      "rows": 6, "kept": 4, "empty input": 1, "empty output": 1, "examples": 2
  }
  assert "qasper/validation.jsonl:4" in caplog.text and "empty output" in caplog.text
  assert "qasper/validation.jsonl:5" in caplog.text and "empty input" in caplog.text
  examples = raw(name, "validation", lengths)
  assert [list(ex["references"]) for ex in examples] == [[b"yes", b"It is."], [b"Alice", b"alice"]]
  task = seqio.get_mixture_or_task(name)
  assert [task.postprocess_fn("ignored", example=ex, is_target=True) for ex in examples] == [
      ["yes", "It is."],
      ["Alice", "alice"],
  ]


def test_local_train_keeps_one_example_per_reference(local_task_names):
  name = "scrolls_qasper_local_fixture"
  batch = converted(name, "train", {"inputs": 64, "targets": 16})
  assert [ex["id"] for ex in batch] == [b"t1", b"t1", b"t2"]
  assert [decode(ex["decoder_target_tokens"]) for ex in batch] == ["yes", "Yes, it is.", "Bob"]


def test_local_test_split_has_no_references(local_task_names):
  examples = raw("scrolls_qasper_local_fixture", "test", {"inputs": 64, "targets": 16})
  assert [ex["id"] for ex in examples] == [b"s1", b"s2"]
  assert [len(ex["references"]) for ex in examples] == [0, 0]
  assert [list(ex["targets"]) for ex in examples] == [[BYTES.eos_id]] * 2


def test_zip_through_environment_variable(local_dir, monkeypatch):
  names = scrolls.register_scrolls_local_tasks(None, BYTES, name_suffix="_env")
  monkeypatch.setenv(scrolls_files.DATA_DIR_ENV, str(local_dir))
  batch = converted("scrolls_quality_local_env", "validation", {"inputs": 64, "targets": 16})
  assert [ex["id"] for ex in batch] == [b"v1", b"v2"]
  assert decode(batch[1]["encoder_input_tokens"]) == "Who wrote it? Other doc."
  monkeypatch.delenv(scrolls_files.DATA_DIR_ENV)
  with pytest.raises(ValueError, match="SCROLLS_DATA_DIR"):
    seqio.get_mixture_or_task(names[0]).get_dataset(None, split="train")


def test_truncation_is_counted_and_logged(local_task_names, caplog):
  name = "scrolls_qasper_local_fixture"
  lengths = {"inputs": 16, "targets": 4}
  with caplog.at_level(logging.WARNING):
    batch = converted(name, "train", lengths)
  # Hand count: inputs need len(text) + EOS <= 16, targets len + EOS <= 4.
  texts = [("Is it? Doc one.", "yes"), ("Is it? Doc one.", "Yes, it is."), ("Who? Doc two.", "Bob")]
  examples = raw(name, "train", lengths)
  assert [bool(ex["targets_truncated"]) for ex in examples] == [False, True, False]
  assert scrolls.truncation_counts(examples) == {
      "examples": 3,
      "inputs": sum(len(i) + 1 > 16 for i, _ in texts),
      "targets": sum(len(t) + 1 > 4 for _, t in texts),
  } == {"examples": 3, "inputs": 0, "targets": 1}
  assert decode(batch[1]["decoder_target_tokens"]) == "Yes"
  assert batch[1]["decoder_target_tokens"][3] == BYTES.eos_id
  assert re.search(r"1 of \d examples so far had targets longer than 4 tokens", caplog.text)


def test_truncation_defaults_to_the_task_lengths():
  dataset = tf.data.Dataset.from_tensors(
      {"inputs": tf.range(3, 30, dtype=tf.int32), "targets": tf.range(3, 8, dtype=tf.int32)}
  )
  features = {"inputs": seqio.Feature(BYTES), "targets": seqio.Feature(BYTES)}
  out = scrolls.truncate(
      dataset, features, None, task_label="unit", default_lengths={"inputs": 10, "targets": 6}
  )
  (example,) = list(out.as_numpy_iterator())
  np.testing.assert_array_equal(example["inputs"], np.arange(3, 12))  # 9 + room for EOS
  np.testing.assert_array_equal(example["targets"], np.arange(3, 8))  # 5 + EOS fits
  assert scrolls.truncation_counts([example]) == {"examples": 1, "inputs": 1, "targets": 0}
  assert scrolls.feature_lengths("contract_nli") == {"inputs": 8192, "targets": 128}
  assert scrolls.feature_lengths("gov_report") == {"inputs": 16384, "targets": 1024}


def test_tfds_build_from_local_zip(tmp_path):
  source = tmp_path / "official"
  write_zip(source, "qasper", QASPER)
  tfds_dir = str(tmp_path / "tfds")
  builder = scrolls_files.prepare_tfds_from_local(
      "qasper", tfds_data_dir=tfds_dir, source_dir=str(source)
  )
  assert builder.info.splits["validation"].num_examples == len(QASPER["validation"])
  # The catalogue builder, read back through tfds.load by its name and version.
  loaded = tfds.load("scrolls/qasper:1.0.0", split="validation", data_dir=tfds_dir)
  assert {ex["pid"].decode() for ex in tfds.as_numpy(loaded)} == {
      row["pid"] for row in QASPER["validation"]
  }
  scrolls.register_scrolls_tasks(BYTES, tfds_data_dir=tfds_dir, name_suffix="_tfds_fixture")
  name = "scrolls_qasper_tfds_fixture"
  lengths = {"inputs": 64, "targets": 16}
  batch = converted(name, "validation", lengths)
  examples = raw(name, "validation", lengths)
  # TFDS shuffles rows when it writes them: compare groups, not order.
  assert sorted(ex["id"] for ex in batch) == [b"v1", b"v2"]
  groups = {ex["id"]: sorted(ex["references"]) for ex in examples}
  assert groups == {b"v1": [b"It is.", b"yes"], b"v2": [b"Alice", b"alice"]}
  for ex in batch:
    assert decode(ex["decoder_target_tokens"]) in [r.decode() for r in groups[ex["id"]]]
  train = raw(name, "train", lengths)
  assert sorted(ex["id"] for ex in train) == [b"t1", b"t1", b"t2"]


def test_tfds_not_prepared_says_how(tmp_path):
  with pytest.raises(FileNotFoundError, match="not prepared"):
    next(scrolls_files.tfds_rows("qasper", "validation", str(tmp_path)))


def test_bad_lines_name_file_line_and_field(tmp_path):
  root = tmp_path / "bad"
  (root / "qasper").mkdir(parents=True)
  good = json.dumps({"id": "a", "pid": "a_0", "input": "x", "output": "y"})
  (root / "qasper" / "validation.jsonl").write_text(good + "\n{not json\n")
  with pytest.raises(ValueError, match=r"qasper/validation.jsonl:2: malformed JSON"):
    list(scrolls_files.local_rows(str(root), "qasper", "validation"))
  (root / "qasper" / "train.jsonl").write_text(good + "\n" + json.dumps({"id": "b", "input": "x"}))
  with pytest.raises(ValueError, match=r"train.jsonl:2: missing field 'output'"):
    list(scrolls_files.local_rows(str(root), "qasper", "train"))
  # Through seqio: validation reads its file when the dataset is built.
  scrolls.register_scrolls_local_tasks(str(root), BYTES, name_suffix="_bad")
  with pytest.raises(ValueError, match=r"validation.jsonl:2: malformed JSON"):
    seqio.get_mixture_or_task("scrolls_qasper_local_bad").get_dataset(None, split="validation")
  # Training checks its whole file when the dataset is built too: a plain error, raised
  # once (from inside tf.data it was reported at every retry, issue 15 §6.5).
  with pytest.raises(ValueError, match=r"train.jsonl:2: missing field 'output'"):
    seqio.get_mixture_or_task("scrolls_qasper_local_bad").get_dataset(None, split="train")
  with pytest.raises(FileNotFoundError, match=r"gov_report.zip"):
    list(scrolls_files.local_rows(str(root), "gov_report", "train"))


@pytest.mark.parametrize("split", ["train", "validation"])
def test_an_empty_file_is_an_error_naming_it(tmp_path, split):
  """Issue 15 §6.4: an empty train.jsonl gave a bare StopIteration after 25 s, and an empty
  validation.jsonl an evaluation without metrics that exited 0."""
  (tmp_path / "qasper").mkdir()
  (tmp_path / "qasper" / f"{split}.jsonl").write_text("\n")
  scrolls.register_scrolls_local_tasks(str(tmp_path), BYTES, name_suffix=f"_empty_{split}")
  task = seqio.get_mixture_or_task(f"scrolls_qasper_local_empty_{split}")
  path = tmp_path / "qasper" / f"{split}.jsonl"
  with pytest.raises(ValueError, match=rf"{split}: {path} has no usable rows"):
    task.get_dataset(None, split=split)


def test_metric_is_wired_to_the_task(local_task_names):
  task = seqio.get_mixture_or_task("scrolls_qasper_local_fixture")
  (metric_fn,) = task.metric_fns
  assert metric_fn(targets=[["yes", "It is."]], predictions=["it is"])["f1"] == 100.0


def test_registration_is_idempotent_and_builds_mixtures(local_dir):
  first = scrolls.register_scrolls_local_tasks(str(local_dir), BYTES, name_suffix="_twice")
  second = scrolls.register_scrolls_local_tasks(str(local_dir), BYTES, name_suffix="_twice")
  assert first == second == [f"scrolls_{t}_local_twice" for t in scrolls_table.NAMES]
  mixture = seqio.get_mixture_or_task("scrolls_local_twice")
  assert sorted(t.name for t in mixture.tasks) == sorted(first)
