"""Test-wide set-up: eight simulated CPU devices for the tests that need a mesh, and XLA's
CPU backend unoptimised.

XLA reads the flags once, when jax first initialises its backend, so they are set here,
before any test module imports jax. The subprocesses the tests start inherit them
(tests/trainer_fixtures.py, tests/multiprocess_fixtures.py, the benchmark script's runs).

`--xla_backend_optimization_level=0` turns off LLVM's optimisation of the generated
kernels only: XLA's graph passes and the operations are the same, and every test checks
values, not speed, on tiny shapes that run in microseconds, while compiling is most of
the suite's time (measured on a loaded machine: tests/test_network.py 90 -> 63
CPU-seconds, tests/layers/test_conditional.py 69 -> 55, tests/test_decoding.py 22 ->
15). A run that sets its own level keeps it, e.g. to test the optimised kernels:
`XLA_FLAGS=--xla_backend_optimization_level=3 make test` (XLA's default).
"""

import atexit
import os
import shutil
import tempfile

_flags = os.environ.get("XLA_FLAGS", "").split()
_flags.append("--xla_force_host_platform_device_count=8")
if not any(flag.startswith("--xla_backend_optimization_level") for flag in _flags):
  _flags.append("--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow is only a data-pipeline library here: keep it off any accelerator memory.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# One persistent compilation cache for the whole run, made by the first process (pytest's,
# or xdist's controller) and inherited by the workers and every subprocess a test starts:
# the tests build the same tiny models in many files and processes (trainer CLIs, the
# demo, the benchmark script), and a program compiled once is then read back, not
# compiled again. Removed when that process exits; a JAX_COMPILATION_CACHE_DIR set
# outside is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="colt5_flax_tests_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
