"""colt5_flax.jsonl: reading names the bad line; writing turns numpy/JAX values into JSON."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from colt5_flax import jsonl


def test_read_lines_skips_blank_lines_and_gives_locations():
  lines = ['{"a": 1}\n', "\n", '{"b": [2, 3]}\n']
  assert list(jsonl.read_lines(lines, "f.jsonl")) == [
      ("f.jsonl:1", {"a": 1}),
      ("f.jsonl:3", {"b": [2, 3]}),
  ]


@pytest.mark.parametrize(
    "line, message",
    [("{not json", r"f.jsonl:2: malformed JSON line"), ("[1, 2]", r"f.jsonl:2: expected a JSON "
                                                          r"object, got list")],
)
def test_read_lines_names_the_bad_line(line, message):
  with pytest.raises(ValueError, match=message):
    list(jsonl.read_lines(['{"ok": 1}', line], "f.jsonl"))


def test_write_and_read_round_trip_numpy_values(tmp_path):
  path = tmp_path / "sub" / "records.jsonl"
  jsonl.write(path, [
      {"step": np.int64(3), "loss": jnp.float32(0.5), "id": b"qasper-1", "ids": np.arange(2)},
      {"step": 4, "loss": float("nan"), "inf": np.float32(np.inf)},
  ])
  lines = path.read_text().splitlines()
  assert json.loads(lines[0]) == {"step": 3, "loss": 0.5, "id": "qasper-1", "ids": [0, 1]}
  assert json.loads(lines[1]) == {"step": 4, "loss": "nan", "inf": "inf"}
  assert [record for _, record in jsonl.read(path)] == [json.loads(line) for line in lines]


def test_append_then_drop_records_after_a_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  for step in (1, 2, 3, 4):
    jsonl.append(path, {"step": step, "loss": 1.0 / step})
  jsonl.drop_records_after(path, 2)
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
  jsonl.drop_records_after(tmp_path / "absent.jsonl", 2)  # nothing to do, no error
