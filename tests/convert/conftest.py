"""The conversion script, loaded once per test process for every test module here."""

import importlib.util
import pathlib
import sys

import pytest

_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "convert_hf_checkpoint.py"


@pytest.fixture(scope="session")
def script():
  """scripts/convert_hf_checkpoint.py as a module. Its absl flags can be defined once per
  process, so every module shares this one load."""
  name = "convert_hf_checkpoint"
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
  return sys.modules[name]
