"""The official SCROLLS files and the TFDS build: rows as released.

The seven tasks are released as `<config>/{train,validation,test}.jsonl` (also zipped as
`<config>.zip`), one row per (example, reference) with fields `id, pid, input, output`;
test outputs are null. TFDS `scrolls/<config>:1.0.0` holds the same rows.
`scrolls.py` turns rows into seqio examples.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator

import tensorflow as tf
import tensorflow_datasets as tfds

from colt5_flax import jsonl
from colt5_flax.data import scrolls_table

TFDS_VERSION = "1.0.0"
SPLITS = ("train", "validation", "test")
DATA_DIR_ENV = "SCROLLS_DATA_DIR"
REQUIRED_FIELDS = ("id", "input", "output")


def read_jsonl_rows(lines: Iterable[str], source: str) -> Iterator[dict]:
  """Parses official-format JSONL lines into rows.

  Args:
    lines: the lines of one `<split>.jsonl` file.
    source: the file's name, used in error messages and in each row's `_location`.

  Yields:
    dicts with `id`, `pid` (None when absent), `input`, `output` (None on test) and
    `_location` = "source:line".

  Raises:
    ValueError: on a malformed line (with file:line) or a missing field (named).
  """
  for location, row in jsonl.read_lines(lines, source):
    for field in REQUIRED_FIELDS:
      if field not in row:
        raise ValueError(f"{location}: missing field {field!r} (fields: {sorted(row)})")
    if not isinstance(row["input"], str):
      raise ValueError(f"{location}: field 'input' must be a string, got {row['input']!r:.50}")
    if row["output"] is not None and not isinstance(row["output"], str):
      raise ValueError(
          f"{location}: field 'output' must be a string or null, got {row['output']!r:.50}"
      )
    yield {
        "id": str(row["id"]),
        "pid": None if row.get("pid") is None else str(row["pid"]),
        "input": row["input"],
        "output": row["output"],
        "_location": location,
    }


def split_name(split: str) -> str:
  """'validation[:10%]' -> 'validation'."""
  return split.split("[", 1)[0]


def open_local_split(
    data_dir: str, config: str, split: str
) -> tuple[Callable[[], Iterable[str]], str]:
  """Where `<config>/<split>.jsonl` lives under `data_dir`: a folder or `<config>.zip`.

  Returns:
    (a function that opens the file and returns its lines, the file's display name).
  """
  split = split_name(split)
  plain = os.path.join(data_dir, config, f"{split}.jsonl")
  if tf.io.gfile.exists(plain):

    def open_plain():
      with tf.io.gfile.GFile(plain, "r") as f:
        yield from f

    return open_plain, plain
  archive = os.path.join(data_dir, f"{config}.zip")
  if tf.io.gfile.exists(archive):
    with tf.io.gfile.GFile(archive, "rb") as f, zipfile.ZipFile(f) as zf:
      names = set(zf.namelist())
    member = next(
        (m for m in (f"{config}/{split}.jsonl", f"{split}.jsonl") if m in names), None
    )
    if member is None:
      raise FileNotFoundError(
          f"{archive} has no {config}/{split}.jsonl (it holds {sorted(names)[:10]})"
      )

    def open_member():
      with tf.io.gfile.GFile(archive, "rb") as f, zipfile.ZipFile(f) as zf:
        with zf.open(member) as raw:
          yield from io.TextIOWrapper(raw, encoding="utf-8")

    return open_member, f"{archive}!{member}"
  raise FileNotFoundError(
      f"SCROLLS {config}/{split}: neither {plain} nor {archive} exists "
      f"(data_dir={data_dir!r}; set {DATA_DIR_ENV} or pass data_dir)"
  )


def local_rows(data_dir: str, config: str, split: str) -> Iterator[dict]:
  """The rows of one split of the official files under `data_dir` (see `read_jsonl_rows`)."""
  open_lines, source = open_local_split(data_dir, config, split)
  yield from read_jsonl_rows(open_lines(), source)


def tfds_name(config: str) -> str:
  return f"scrolls/{config}:{TFDS_VERSION}"


def tfds_rows(
    config: str,
    split: str,
    tfds_data_dir: str | None = None,
    shuffle_files: bool = False,
    seed: int | None = None,
) -> Iterator[dict]:
  """The rows of TFDS `scrolls/<config>:1.0.0` (already prepared; nothing is downloaded)."""
  builder = tfds.builder(tfds_name(config), data_dir=tfds_data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS {tfds_name(config)} is not prepared in {builder.data_dir!r}: run `tfds build "
        f"scrolls --config {config}` or colt5_flax.data.scrolls_files.prepare_tfds_from_local"
    )
  read_config = tfds.ReadConfig(shuffle_seed=seed) if seed is not None else None
  dataset = builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config)
  for ex in tfds.as_numpy(dataset):
    row = {k: ex[k].decode("utf-8") for k in ("id", "pid", "input", "output")}
    # The TFDS builder stores the test split's null outputs as "".
    row["_location"] = f"{tfds_name(config)}[{split}] pid={row['pid']}"
    yield row


def prepare_tfds_from_local(config: str, *, tfds_data_dir: str, source_dir: str):
  """Builds TFDS `scrolls/<config>:1.0.0` from the official files, without downloading.

  The catalogue builder downloads `<config>.zip`; here its download step is replaced by
  `source_dir` (holding `<config>.zip` or the folder `<config>/`), for clusters that keep
  the data on their own storage. The prepared dataset is the catalogue's, byte for byte.

  Returns:
    the prepared `tfds.core.DatasetBuilder`.
  """
  scrolls_table.get(config)
  builder = tfds.builder(tfds_name(config), data_dir=tfds_data_dir)
  catalogue_generate_examples = builder._generate_examples  # pylint: disable=protected-access

  def split_generators(dl_manager):
    folder = os.path.join(source_dir, config)
    archive = os.path.join(source_dir, f"{config}.zip")
    if tf.io.gfile.isdir(folder):
      root = tfds.core.Path(folder)
    elif tf.io.gfile.exists(archive):
      extracted = dl_manager.extract(archive)
      root = extracted / config if (extracted / config).is_dir() else extracted
    else:
      raise FileNotFoundError(f"neither {folder}/ nor {archive} exists")
    return {split: catalogue_generate_examples(root / f"{split}.jsonl") for split in SPLITS}

  builder._split_generators = split_generators  # pylint: disable=protected-access
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False)
  )
  return builder
