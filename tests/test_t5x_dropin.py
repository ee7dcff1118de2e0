"""Our models under t5x's own trainer (configs/t5x/), where t5x is installed from source.

t5x is not on PyPI, so this module is skipped unless `import t5x` works. Where it does,
every configs/t5x/ file is parsed with the configurations it is meant for, and CoLT5-tiny
trains one step with `python -m t5x.train` on the synthetic retrieval task.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("t5x")

import gin  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# configs/t5x file -> the files it is combined with (before it, after it) and bindings.
COMBINATIONS = {
    "t5x/model.gin": (["models/colt5_tiny.gin"], [], []),
    "t5x/pretrain_ul2.gin": (
        ["models/colt5_base.gin", "t5x/model.gin"], [], ["MODEL_DIR = '/tmp/unused'"]
    ),
    "t5x/finetune_scrolls.gin": (
        ["models/colt5_base.gin", "t5x/model.gin"],
        ["tasks/scrolls_qasper.gin"],
        ["MODEL_DIR = '/tmp/unused'", "INITIAL_CHECKPOINT_PATH = '/tmp/unused'"],
    ),
    "t5x/test_tiny.gin": (
        ["models/colt5_tiny.gin", "t5x/model.gin"], [], ["MODEL_DIR = '/tmp/unused'"]
    ),
}


def _t5x_search_path() -> str:
  import t5x

  # t5x's own files are included as 't5x/configs/runs/...': the directory above the package.
  return str(Path(t5x.__file__).resolve().parents[1])


def test_every_t5x_file_is_covered():
  files = {str(p.relative_to(CONFIGS)) for p in (CONFIGS / "t5x").glob("*.gin")}
  assert files == set(COMBINATIONS)


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_t5x_file_parses_and_builds_the_model(name, monkeypatch):
  from t5x import models
  from t5x import train as t5x_train

  from colt5_flax import count_params, network

  # t5x's run files bind `import __main__ as train_script`: t5x.train when it runs.
  monkeypatch.setitem(sys.modules, "__main__", t5x_train)
  before, after, bindings = COMBINATIONS[name]
  gin.clear_config()
  try:
    for path in (str(CONFIGS), _t5x_search_path()):
      gin.add_config_file_search_path(path)
    gin.parse_config_files_and_bindings(
        before + [name] + after, bindings, finalize_config=True, skip_unknown=False
    )
    model = count_params.model_from_gin()
    assert isinstance(model, models.EncoderDecoderModel)
    assert isinstance(model.module, network.EncoderDecoder)
  finally:
    gin.clear_config()


@pytest.mark.slow
def test_one_training_step_through_t5x_train(tmp_path):
  model_dir = tmp_path / "run"
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "t5x.train",
          f"--gin_search_paths={CONFIGS}",
          "--gin_file=models/colt5_tiny.gin",
          "--gin_file=t5x/model.gin",
          "--gin_file=t5x/test_tiny.gin",
          f"--gin.MODEL_DIR='{model_dir}'",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=900,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-5000:]
  assert any(p.name.startswith("checkpoint_1") for p in model_dir.iterdir())
