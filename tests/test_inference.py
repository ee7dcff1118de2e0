"""colt5_flax.inference's batch building, checked against hand-written batches.

The model calls (`predict_examples`, `evaluate_tasks`, `restore_for_inference`) run
end to end in tests/test_train_cli.py and tests/test_demo.py.
"""

import numpy as np
import pytest

from colt5_flax import inference

LENGTHS = {"inputs": 4, "targets": 3}


def test_encdec_batch_pads_truncates_and_shifts():
  examples = [
      {"inputs": np.array([5, 6, 7, 8, 9]), "targets": np.array([11, 12])},
      {"inputs": np.array([3]), "targets": np.array([21, 22, 23, 24])},
  ]
  batch = inference.encdec_batch(examples, LENGTHS, batch_size=3)
  np.testing.assert_array_equal(
      batch["encoder_input_tokens"], [[5, 6, 7, 8], [3, 0, 0, 0], [0, 0, 0, 0]]
  )
  np.testing.assert_array_equal(
      batch["decoder_target_tokens"], [[11, 12, 0], [21, 22, 23], [0, 0, 0]]
  )
  np.testing.assert_array_equal(
      batch["decoder_input_tokens"], [[0, 11, 12], [0, 21, 22], [0, 0, 0]]
  )
  np.testing.assert_array_equal(batch["decoder_loss_weights"], [[1, 1, 0], [1, 1, 1], [0, 0, 0]])


def test_encdec_batch_refuses_too_many_examples():
  examples = [{"inputs": np.array([1]), "targets": np.array([1])}] * 3
  with pytest.raises(ValueError, match="3 examples do not fit a batch of 2"):
    inference.encdec_batch(examples, LENGTHS, batch_size=2)


def test_batches_cover_every_example_once():
  examples = [{"inputs": np.array([i + 1]), "targets": np.array([i + 1])} for i in range(5)]
  chunks = list(inference.batches(examples, LENGTHS, batch_size=2))
  assert [num_rows for num_rows, _ in chunks] == [2, 2, 1]
  firsts = np.concatenate([b["encoder_input_tokens"][:n, 0] for n, b in chunks])
  np.testing.assert_array_equal(firsts, [1, 2, 3, 4, 5])


@pytest.mark.parametrize(
    "value", [b"qasper-1", np.array(b"qasper-1"), "qasper-1", np.array("qasper-1")]
)
def test_feature_text(value):
  assert inference.feature_text(value) == "qasper-1"
