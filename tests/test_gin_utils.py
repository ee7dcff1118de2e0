"""gin_utils: error messages for bad bindings, quiet includes, ablations that change nothing.

In process, nothing compiles: the ablation check runs once the model is built abstractly
(`Trainer.abstract_state`), before train() logs its topology.
"""

import logging

import gin
import pytest

from colt5_flax import gin_utils, partitioning
from colt5_flax import train as train_lib

CONFIGS = gin_utils._REPO_CONFIGS
ABLATIONS = sorted(p.stem for p in (CONFIGS / "ablations").glob("*.gin"))
DATA_ABLATIONS = ("pegasus_objective",)


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()
  gin_utils._parsed_ablation_files.clear()


def _parse(files, bindings):
  gin_utils.parse_gin_flags([str(CONFIGS)], files, bindings, finalize_config=False)


def test_an_unquoted_string_names_the_binding_and_the_quotes():
  """Issue 15 §6.5: `--gin.MODEL_DIR=/tmp/x` used to end in 'Unable to parse value. (line 1)'."""
  with pytest.raises(ValueError) as error:
    _parse(["runs/test_tiny.gin"], ["TRAIN_STEPS = 3", "MODEL_DIR = /tmp/x"])
  message = str(error.value)
  assert "'MODEL_DIR = /tmp/x'" in message and "--gin.MODEL_DIR" in message
  assert "strings need their own quotes" in message
  assert "--gin.MODEL_DIR=\"'/tmp/x'\"" in message


def test_an_unparsable_line_in_a_file_names_file_and_line(tmp_path):
  bad = tmp_path / "bad.gin"
  bad.write_text("X = 1\nY = /oops\n")
  with pytest.raises(ValueError, match=rf"{bad}:2: 'Y = /oops'"):
    _parse([str(bad)], [])


def test_relative_includes_log_no_path_errors(caplog, tmp_path):
  """Issue 14 §9: gin probed each search path as a package and logged 'Path not found'."""
  # models/colt5_tiny.gin includes architectures/colt5.gin, which includes t5_1_1.gin.
  with caplog.at_level(logging.DEBUG):
    _parse(["models/colt5_tiny.gin", "runs/test_tiny.gin"], ["MODEL_DIR = '/tmp/x'"])
  assert not [r for r in caplog.records if "Path not found" in r.getMessage()]
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
  # The configuration itself is not dumped to the console (it goes to config.gin).
  assert not [r for r in caplog.records if "train_script.train.model" in r.getMessage()]
  # A missing include still fails, naming the file.
  missing = tmp_path / "missing.gin"
  missing.write_text("include 'architectures/nowhere.gin'\n")
  gin.clear_config()
  with pytest.raises(IOError, match="nowhere.gin"):
    _parse([str(missing)], [])


class _Built(Exception):
  """train() got past the ablation check (raised where it logs the mesh)."""


def _train_until_built(monkeypatch, files, bindings):
  def built(*args, **kwargs):
    raise _Built

  monkeypatch.setattr(partitioning, "log_topology", built)
  _parse(files, bindings)
  gin_utils.check_required_macros()
  gin.finalize()
  gin.get_configurable(train_lib.train)()


def _finetune(model_file, ablation):
  files = [model_file, "runs/finetune_scrolls.gin", "tasks/scrolls_qasper.gin"]
  if ablation in DATA_ABLATIONS:
    files = [model_file, "runs/pretrain_ul2.gin"]
  return files + [f"ablations/{ablation}.gin"], [
      "MODEL_DIR = '/tmp/unused'", "INITIAL_CHECKPOINT_PATH = None"
  ][: 1 if ablation in DATA_ABLATIONS else 2]


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_ablation_applies_to_colt5(monkeypatch, ablation):
  with pytest.raises(_Built):
    _train_until_built(monkeypatch, *_finetune("models/colt5_tiny.gin", ablation))


@pytest.mark.parametrize(
    "model_file, ablation",
    [
        ("models/longt5_tglobal_tiny.gin", "static_routing"),  # the case
        ("models/longt5_tglobal_tiny.gin", "routed_tokens_512"),
        ("models/t5_1_1_tiny.gin", "kv_equals_queries"),
    ],
)
def test_an_ablation_that_changes_nothing_is_refused(monkeypatch, model_file, ablation):
  """Issue 15 §6.6: LongT5 has no router, so static routing would train the baseline."""
  with pytest.raises(ValueError, match=rf"ablations/{ablation}.gin changes nothing"):
    _train_until_built(monkeypatch, *_finetune(model_file, ablation))
