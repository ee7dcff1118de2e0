"""Test-wide set-up: eight simulated CPU devices for the tests that need a mesh.

XLA reads the flag once, when jax first initialises its backend, so it is set here,
before any test module imports jax.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    f for f in [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"] if f
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow is only a data-pipeline library here: keep it off any accelerator memory.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
