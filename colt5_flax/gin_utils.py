"""Flags and gin parsing shared by `colt5_flax.train`, `.evaluate` and `.infer` (t5x's CLI).

    python -m colt5_flax.train \\
      --gin_file=runs/test_tiny.gin \\
      --gin.MODEL_DIR="'/tmp/run'" --gin.TRAIN_STEPS=100 \\
      --gin_search_paths=/my/configs

- `--gin_file` (repeatable) are parsed in order, later files override earlier ones; a
  relative path is looked up in `--gin_search_paths` (default: the current directory and
  this repository's `configs/`).
- `--gin.NAME=VALUE` becomes the binding `NAME = VALUE` (t5x's shorthand for
  `--gin_bindings`), applied after the files. VALUE is a gin (Python) literal: strings need
  their own quotes, `--gin.MODEL_DIR="'/tmp/run'"`.
- `--multiprocess` (alias `--multiprocess_gpu`) calls `jax.distributed.initialize()` first,
  with `--coordinator_address`, `--process_count`, `--process_index` when given, and
  `--heartbeat_timeout_seconds` (how soon the others stop when one process dies) and
  `--initialization_timeout` (docs/multihost.md).

Module code has no gin decorators: the entry point wraps its function at run time
(`gin.configurable(train)`, as t5x's `train.py` does), and gin files bind it through
dynamic registration (`from colt5_flax import train as train_script`,
`train_script.train.model_dir = %MODEL_DIR`).

Checks made before anything compiles: gin's own (unknown configurable or parameter:
`ValueError`/`NameError`/`AttributeError` naming the binding), a binding whose value does
not parse (named, with the reminder that strings need quotes), a macro set on the command
line that no configuration reads (a typo such as `--gin.TRAIN_STEP=5`), and a required
macro left unset (`MODEL_DIR = %gin.REQUIRED`). Once the model is built,
`check_ablations_apply` refuses an `ablations/*.gin` file none of whose bindings the run
uses (e.g. `ablations/static_routing.gin` on a LongT5 model, which has no router).

The operative configuration goes to `MODEL_DIR/config.gin`, not to the console.
"""

from __future__ import annotations

import difflib
import logging as std_logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import gin
from absl import app, flags, logging

from colt5_flax import partitioning

_REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
_DEFAULT_SEARCH_PATHS = ["."] + ([str(_REPO_CONFIGS)] if _REPO_CONFIGS.is_dir() else [])

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", None, "Gin config files, parsed in order (repeatable).")
flags.DEFINE_multi_string(
    "gin_bindings", [], "Gin bindings applied after the files; `--gin.NAME=VALUE` is short for "
    "`--gin_bindings='NAME = VALUE'`."
)
flags.DEFINE_list(
    "gin_search_paths", _DEFAULT_SEARCH_PATHS, "Directories searched for gin files (comma list)."
)
flags.DEFINE_bool(
    "multiprocess", False, "Multi-host run: call jax.distributed.initialize() before anything else."
)
flags.DEFINE_alias("multiprocess_gpu", "multiprocess")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("process_count", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_index", None, "This process's index (multi-host).")
flags.DEFINE_integer(
    "heartbeat_timeout_seconds", 100, "Multi-host: a process silent this long is declared "
    "dead and every other process stops with an error naming it (JAX's coordination service)."
)
flags.DEFINE_integer(
    "initialization_timeout", 300, "Multi-host: seconds to wait for every process to join."
)

_MACRO_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ABLATIONS_DIR = "ablations"
# The ablation files of the last `parse_gin_flags` (checked by `check_ablations_apply`).
_parsed_ablation_files: list[str] = []


class _GinPathProbeFilter(std_logging.Filter):
  """Drops gin's "Path not found" ERROR records.

  gin probes each search path for an `include` also as a Python package path
  (gin/resource_reader.py) and logs every miss at ERROR, although the file is found in
  another search path; a file found nowhere still fails with gin's own IOError.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (record.module == "resource_reader" and record.msg.startswith("Path not found"))


_PATH_PROBE_FILTER = _GinPathProbeFilter()
_REQUIRED_MACRO = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*) = %gin\.REQUIRED$", re.MULTILINE)
_MACRO_REFERENCE = re.compile(r"%([A-Za-z_][A-Za-z0-9_.]*)")


def rewrite_gin_args(args: Sequence[str]) -> list[str]:
  """`--gin.NAME=VALUE` -> `--gin_bindings=NAME = VALUE`; other arguments unchanged.

  Raises:
    ValueError: for `--gin.NAME` without `=VALUE`.
  """

  def rewrite(arg: str) -> str:
    if not arg.startswith("--gin."):
      return arg
    if "=" not in arg:
      raise ValueError(f"Gin bindings must be of the form --gin.NAME=VALUE, got {arg!r}")
    name, value = arg[len("--gin.") :].split("=", 1)
    return f"--gin_bindings={name} = {value}"

  return [rewrite(arg) for arg in args]


def parse_gin_flags(
    gin_search_paths: Sequence[str],
    gin_files: Sequence[str] | None,
    gin_bindings: Sequence[str],
    *,
    finalize_config: bool = True,
) -> None:
  """Parses the files, then the bindings, then checks the bindings (see module docstring).

  Raises:
    ValueError: an unparsable or unknown binding, or an unused command-line macro.
    FileNotFoundError: a gin file that is in no search path.
  """
  for path in gin_search_paths:
    gin.add_config_file_search_path(path)
  gin_files = [_find_gin_file(name, gin_search_paths) for name in gin_files or []]
  std_logging.getLogger().addFilter(_PATH_PROBE_FILTER)  # root: where gin logs
  try:
    gin.parse_config_files_and_bindings(
        gin_files, list(gin_bindings), finalize_config=False, skip_unknown=False
    )
  except SyntaxError as error:
    raise ValueError(_syntax_error_message(error)) from error
  except (NameError, AttributeError) as error:
    # gin's message names the binding and its file/line; ValueError is the project's type
    # for bad user input.
    raise ValueError(f"Invalid gin configuration: {error}") from error
  check_command_line_macros(gin_bindings)
  _parsed_ablation_files[:] = [
      path for path in gin_files if os.path.basename(os.path.dirname(path)) == _ABLATIONS_DIR
  ]
  if finalize_config:
    gin.finalize()
  logging.info("Gin files: %s; bindings: %s", gin_files, list(gin_bindings))


def _syntax_error_message(error: SyntaxError) -> str:
  """Names the unparsable binding; a command-line one gets the quoting reminder."""
  line = (error.text or "").strip()
  if error.filename:  # in a gin file: gin's message has the file and line
    return f"Invalid gin configuration: {error} in {error.filename}:{error.lineno}: {line!r}"
  name, _, value = line.partition("=")
  name, value = name.strip(), value.strip()
  return (
      f"Cannot parse the gin binding {line!r} (--gin.{name}=... or --gin_bindings): "
      f"{error.msg}. VALUE must be a Python literal or a gin reference (@name, %MACRO); "
      f"strings need their own quotes inside the shell's: --gin.{name}=\"'{value}'\""
  )


def _find_gin_file(name: str, search_paths: Sequence[str]) -> str:
  candidates = [name] if os.path.isabs(name) else [os.path.join(p, name) for p in search_paths]
  for candidate in candidates:
    if os.path.exists(candidate):
      return candidate
  raise FileNotFoundError(
      f"--gin_file={name!r} not found in the search paths {list(search_paths)}"
  )


def check_command_line_macros(gin_bindings: Sequence[str]) -> None:
  """Raises ValueError for a `NAME = VALUE` binding whose macro nothing reads.

  Gin accepts any new macro silently, so `--gin.TRAIN_STEP=5` (for TRAIN_STEPS) would
  otherwise train with the default. Bindings of configurable parameters
  (`module.fn.param = ...`) are checked by gin itself.
  """
  config = gin.config_str()
  referenced = set(_MACRO_REFERENCE.findall(config))
  defined = set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*) = ", config, re.MULTILINE))
  for binding in gin_bindings:
    for line in binding.splitlines():
      name = line.split("=", 1)[0].strip()
      if "=" not in line or not _MACRO_NAME.match(name):
        continue
      if name not in referenced:
        candidates = difflib.get_close_matches(name, sorted((referenced | defined) - {name}), n=3)
        hint = f"; did you mean {' or '.join(candidates)}?" if candidates else ""
        raise ValueError(
            f"Unknown gin binding {line.strip()!r}: no configuration reads the macro "
            f"{name}{hint}"
        )


def check_required_macros() -> None:
  """Raises ValueError naming each macro still bound to `%gin.REQUIRED`."""
  missing = sorted(set(_REQUIRED_MACRO.findall(gin.config_str())))
  if missing:
    examples = " ".join(f"--gin.{name}=..." for name in missing)
    raise ValueError(
        f"Required gin macro(s) not set: {', '.join(missing)}; pass them, e.g. {examples} "
        "(strings quoted: --gin.MODEL_DIR=\"'/path/to/run'\")"
    )


def _bound_names(path: str) -> list[tuple[str, str]]:
  """(macro or `module.fn`, parameter or '') of each binding a gin file makes itself."""
  from gin import config_parser

  names = []
  with open(path) as file:
    delegate = gin.config.ParserDelegate(skip_unknown=True)
    for statement in config_parser.ConfigParser(file, delegate):
      if isinstance(statement, config_parser.BindingStatement):
        names.append((statement.selector, statement.arg_name))
  return names


def check_ablations_apply() -> None:
  """Raises ValueError for an `ablations/*.gin` file that changes nothing in this run.

  Call once the model is built (gin's operative configuration then holds every
  parameter the run used). An ablation counts as applied when the run used one of its
  bindings: a macro it sets is read by a used parameter, or a parameter it binds was used.
  Applied to another architecture (`ablations/static_routing.gin` on LongT5, which has no
  router), an ablation would silently train the baseline.
  """
  if not _parsed_ablation_files:
    return
  operative = gin.operative_config_str()
  used_macros = set(_MACRO_REFERENCE.findall(operative))
  used_parameters = set(re.findall(r"^(?:[\w./]+/)?([\w.]+) = ", operative, re.MULTILINE))
  parsed = gin.config_str()
  for path in _parsed_ablation_files:
    bindings = _bound_names(path)
    if not any(re.search(rf"^(?:[\w./]+/)?{re.escape(n)}(\.{p})? = ", parsed, re.MULTILINE)
               for n, p in bindings):
      continue  # gin was cleared since that parse (tests): not this configuration's file
    applied = any(
        (name in used_macros) if not parameter else (f"{name}.{parameter}" in used_parameters)
        for name, parameter in bindings
    )
    if bindings and not applied:
      described = ", ".join(f"{n}.{p}" if p else n for n, p in bindings)
      raise ValueError(
          f"--gin_file={path} changes nothing in this run: the model never reads "
          f"{described}. The ablation is meant for another architecture (its header says "
          "which model files it applies to); drop it or change the model file"
      )


def operative_config() -> str:
  """The gin configuration the run actually used (t5x writes it to MODEL_DIR/config.gin)."""
  return gin.operative_config_str()


def configure_main(function: Callable, argv: Sequence[str]) -> Callable:
  """The shared start of the three entry points' `main`.

  Initialises multi-host JAX when asked, parses and checks gin, and returns `function`
  wrapped by `gin.configurable` (so the gin file's `<module>.<function>.*` bindings apply).
  """
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
  if FLAGS.multiprocess:
    partitioning.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.process_count, FLAGS.process_index,
        heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds,
        initialization_timeout=FLAGS.initialization_timeout,
    )
  parse_gin_flags(
      FLAGS.gin_search_paths, FLAGS.gin_file, FLAGS.gin_bindings, finalize_config=False
  )
  check_required_macros()
  try:
    # Registered by the gin file's dynamic registration (`train_script.train.x = ...`).
    configured = gin.get_configurable(function)
  except ValueError:
    # Not mentioned by any file: register it (before finalizing, which locks the registry).
    configured = gin.configurable(function)
  gin.finalize()
  return configured


def run(main: Callable[[Sequence[str]], None]) -> None:
  """`absl.app.run` after rewriting `--gin.NAME=VALUE` arguments."""
  app.run(main, flags_parser=lambda argv: app.parse_flags_with_usage(rewrite_gin_args(argv)))
