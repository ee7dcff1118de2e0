"""scripts/convert_hf_checkpoint.py on damaged downloads: the error names the file."""


import numpy as np
import pytest

pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")



def _hf_dir(tmp_path):
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text('{"model_type": "t5"}')
  weights = {"shared.weight": np.ones((40, 8), np.float32), "lm_head.weight": np.ones((40, 8))}
  safetensors_numpy.save_file(weights, str(hf_dir / "model.safetensors"))
  return hf_dir


@pytest.mark.parametrize("keep", [0.5, 0.001])  # a cut body, a cut header
def test_a_truncated_model_safetensors_is_named(script, tmp_path, keep):
  """Issue 15 §6.5: transformers' error for a truncated file did not name it."""
  hf_dir = _hf_dir(tmp_path)
  path = hf_dir / "model.safetensors"
  script._check_safetensors(str(hf_dir), {"model.safetensors"})  # intact: no error
  with open(path, "r+b") as file:
    file.truncate(max(int(path.stat().st_size * keep), 4))
  with pytest.raises(ValueError, match=rf"Cannot read {path}: .*truncated"):
    script.load_hf_model(str(hf_dir))


def test_a_missing_shard_is_named(script, tmp_path):
  hf_dir = _hf_dir(tmp_path)
  (hf_dir / "model.safetensors").rename(hf_dir / "model-00001-of-00002.safetensors")
  (hf_dir / "model.safetensors.index.json").write_text(
      '{"weight_map": {"a": "model-00001-of-00002.safetensors", '
      '"b": "model-00002-of-00002.safetensors"}}'
  )
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
    script.load_hf_model(str(hf_dir))
