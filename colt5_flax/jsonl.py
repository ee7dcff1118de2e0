"""JSON Lines files: one JSON object per line.

The project's logs (`train_metrics.jsonl`, `eval_metrics.jsonl`), the predictions `infer`
writes and the official SCROLLS files are all JSONL. Reading checks each line and names
the file and line of a bad one; writing turns numpy and JAX scalars into plain numbers.
Paths may be local or `gs://` (etils.epath).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath


def read_lines(lines: Iterable[str], source: str) -> Iterator[tuple[str, dict[str, Any]]]:
  """The JSON object of each non-blank line, with its location.

  Args:
    lines: the file's lines.
    source: the file's name, for error messages and locations.

  Yields:
    `("source:line", object)`.

  Raises:
    ValueError: a line that is not JSON, or not a JSON object (with file:line).
  """
  for line_number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    location = f"{source}:{line_number}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      raise ValueError(f"{location}: malformed JSON line ({error})") from None
    if not isinstance(record, dict):
      raise ValueError(f"{location}: expected a JSON object, got {type(record).__name__}")
    yield location, record


def read(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
  """`read_lines` of the file at `path`."""
  with epath.Path(path).open("r") as f:
    yield from read_lines(f, str(path))


def dumps(record: Mapping[str, Any]) -> str:
  """One line of JSON (no newline): numpy/JAX scalars become numbers, bytes text, and
  non-finite floats the strings 'nan', 'inf' (JSON has no such numbers)."""
  return json.dumps({k: _jsonable(v) for k, v in record.items()}, default=_jsonable)


def write(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
  """Writes `records` as the file's lines, replacing it (creates the folder)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w") as f:
    for record in records:
      f.write(dumps(record) + "\n")


def append(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
  """Appends one JSON object as a line (process 0 only: one log per run, not per host)."""
  if jax.process_index() != 0:
    return
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("a") as f:
    f.write(dumps(record) + "\n")


def drop_records_after(path: str | os.PathLike, step: int) -> None:
  """Removes lines whose `step` is beyond `step`: a resumed run writes them again."""
  path = epath.Path(path)
  if jax.process_index() != 0 or not path.exists():
    return
  kept = [
      line
      for line in path.read_text().splitlines()
      if line.strip() and json.loads(line).get("step", -1) <= step
  ]
  path.write_text("".join(line + "\n" for line in kept))


def _jsonable(value):
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    value = np.asarray(value).tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if isinstance(value, (str, int, float, bool, list, dict, type(None))):
    return value
  return str(value)
