"""Several `colt5_flax` processes on this machine, as a multi-host job runs them.

- `launch(...)`: starts N processes of an entry point joined by `jax.distributed` (a free
  port on 127.0.0.1; `total_devices / N` simulated CPU devices each; gloo collectives),
  waits for all with a deadline, and kills every child (its whole process group) that is
  still running when the deadline passes or the test fails.
- `python -m tests.multiprocess_fixtures ARGS` (what `launch` starts): runs the entry point
  named by `COLT5_TEST_ENTRY_POINT` (`colt5_flax.train`, `.evaluate` or `.infer`), with
  every process writing the persistent compilation cache (below), and fault hooks set per
  process by environment:
  `COLT5_TEST_SIGTERM_AT_STEP=<step>`: the process sends itself SIGTERM once that step has
  run (a scheduler preempting the job), then pauses while JAX notices it;
  `COLT5_TEST_SIGKILL_IN_SAVE=<step>`: SIGKILL right after the save of that step has
  started, before its files are written (a host lost mid-save).

JAX writes persistent-cache entries from process 0 only, and on CPU the other processes'
cache keys differ from process 0's (measured: process 1 missed in every run and compiled
the train step for 17-28 s while process 0 loaded it in 4 s, then waited at the barrier).
`_cache_in_every_process` lets each process store its own executables, so the second and
later runs of a program load them in every process.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SIGTERM_ENV = "COLT5_TEST_SIGTERM_AT_STEP"
SIGKILL_IN_SAVE_ENV = "COLT5_TEST_SIGKILL_IN_SAVE"
ENTRY_POINT_ENV = "COLT5_TEST_ENTRY_POINT"


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def process_env(num_devices: int, compilation_cache_dir: str | None) -> dict[str, str]:
  """One process's environment: `num_devices` CPU devices, quiet TF, a shared compile cache,
  and the suite's other XLA flags (tests/conftest.py), as every CLI subprocess gets it."""
  from tests import trainer_fixtures

  return trainer_fixtures.subprocess_env(compilation_cache_dir, num_devices)


@dataclasses.dataclass
class Finished:
  """A process's exit code (None: killed at the deadline), when it ended, and its log."""

  returncode: int | None
  seconds: float | None
  log: str


def launch(
    args: Sequence[str],
    num_processes: int,
    *,
    log_dir: Path,
    module: str = "colt5_flax.train",
    total_devices: int = 4,
    compilation_cache_dir: str | None = None,
    extra_env: Callable[[int], dict[str, str]] | None = None,
    heartbeat_timeout_seconds: int = 10,
    timeout: float = 240,
) -> list[Finished]:
  """Runs entry point `module` with `args` as `num_processes` processes; returns how each ended.

  Each process is `python -m tests.multiprocess_fixtures args` running `module`. With one
  process no distributed flags are passed. Every child runs in its own session and is
  killed (with its children) if it outlives `timeout` or this call is interrupted.
  """
  port = free_port()
  log_dir.mkdir(parents=True, exist_ok=True)
  children = []
  start = time.monotonic()
  try:
    for index in range(num_processes):
      env = process_env(total_devices // num_processes, compilation_cache_dir)
      env[ENTRY_POINT_ENV] = module
      env.update(extra_env(index) if extra_env else {})
      distributed = [] if num_processes == 1 else [
          "--multiprocess",
          f"--coordinator_address=127.0.0.1:{port}",
          f"--process_count={num_processes}",
          f"--process_index={index}",
          f"--heartbeat_timeout_seconds={heartbeat_timeout_seconds}",
      ]
      log = open(log_dir / f"process_{index}.log", "w")  # noqa: SIM115 -- closed below
      process = subprocess.Popen(
          [sys.executable, "-m", "tests.multiprocess_fixtures", *args, *distributed],
          cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
          start_new_session=True,
      )
      children.append((process, log))
    ended: list[float | None] = [None] * num_processes
    while time.monotonic() - start < timeout and None in ended:
      for index, (process, _) in enumerate(children):
        if ended[index] is None and process.poll() is not None:
          ended[index] = time.monotonic() - start
      time.sleep(0.2)
  finally:
    for process, log in children:
      if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
      log.close()
  return [
      Finished(process.returncode if ended[i] is not None else None, ended[i],
               (log_dir / f"process_{i}.log").read_text())
      for i, (process, _) in enumerate(children)
  ]


def _cache_in_every_process() -> None:
  """Every process, not only process 0, writes its executables to the persistent cache."""
  try:
    from jax._src import compilation_cache, compiler, distributed
    original_write = compiler._cache_write
  except (ImportError, AttributeError):  # another JAX: process 1 recompiles (slower only)
    return

  def write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
    original_write(cache_key, compile_time_secs, module_name, backend, executable,
                   host_callbacks)
    if distributed.global_state.process_id != 0 and not host_callbacks:
      compilation_cache.put_executable_and_time(
          cache_key, module_name, executable, backend, int(compile_time_secs))

  compiler._cache_write = write


# JAX's SIGTERM listener (XLA's SigtermNotifier) looks for the signal once a second, then
# tells the coordination service, whose notice starts the agreement on a step in every
# process. The test's steps take tens of milliseconds, so without a pause the run can end
# before that (CI: no process saw the notice within the 9 steps left). A scheduler's
# grace period is far longer than one real step, so only the test needs the pause.
PREEMPTION_NOTICE_SECONDS = 3.0  # the 1 s poll, then RPCs on a loaded machine


def _install_sigterm_at(step: int) -> None:
  from colt5_flax import trainer as trainer_lib

  original_step = trainer_lib.Trainer.train_step

  def step_then_maybe_signal(self, state, batch):
    new_state, metrics = original_step(self, state, batch)
    if int(new_state.step) == step:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(PREEMPTION_NOTICE_SECONDS)
    return new_state, metrics

  trainer_lib.Trainer.train_step = step_then_maybe_signal


def _install_sigkill_in_save(step: int) -> None:
  from colt5_flax import checkpoints

  original_save = checkpoints.Checkpointer.save

  def start_save_then_die(self, state, *args, **kwargs):
    saved = original_save(self, state, *args, **kwargs)
    if int(state.step) >= step:
      os.kill(os.getpid(), signal.SIGKILL)  # the background write has barely begun
    return saved

  checkpoints.Checkpointer.save = start_save_then_die


if __name__ == "__main__":
  _cache_in_every_process()
  if os.environ.get(SIGTERM_ENV):
    _install_sigterm_at(int(os.environ[SIGTERM_ENV]))
  if os.environ.get(SIGKILL_IN_SAVE_ENV):
    _install_sigkill_in_save(int(os.environ[SIGKILL_IN_SAVE_ENV]))
  importlib.import_module(os.environ.get(ENTRY_POINT_ENV, "colt5_flax.train")
                          ).console_entry_point()


def run_gpu_launcher(
    args: Sequence[str], *, num_devices: int, compilation_cache_dir: str | None,
    timeout: float = 240,
) -> subprocess.CompletedProcess:
  """`scripts/launch_gpu_multinode.sh ARGS`; its processes (and it) are killed at `timeout`."""
  process = subprocess.Popen(
      [str(REPO_ROOT / "scripts" / "launch_gpu_multinode.sh"), *args],
      cwd=REPO_ROOT, env=process_env(num_devices, compilation_cache_dir),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
  )
  try:
    stdout, stderr = process.communicate(timeout=timeout)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()
  return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
