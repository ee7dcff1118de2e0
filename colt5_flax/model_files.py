"""Building networks from the project's gin model files: one way for every caller.

The model files (`configs/models/<architecture>_<size>.gin`) are the one source of each
encoder kind and size. The trainer parses them through its CLI; count_params, the
benchmark and the tests use this module:

    with model_files.parsed(["models/colt5_base.gin"], ["ACTIVATION_DTYPE = 'float32'"]):
      encoder = model_files.build(network.Encoder)      # what MODEL's encoder would be
      dims = flops.EncoderDims.from_gin("colt5")        # its sizes, read from the macros
      # ... trace, jit and compile `encoder` here: flax modules call the gin-configured
      # factories when they are traced, so the configuration must still be live.

`parsed` clears gin's configuration on entry and on exit: one model per `with` block.
`frozen(name)` evaluates a macro into plain Python objects that need no live
configuration (every gin reference becomes a `functools.partial` with its bindings), for
networks that outlive the block (the tests' fixtures, `convert.hf_architecture`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import gin

from colt5_flax import gin_utils

# The encoder kinds and the architecture file of each (configs/architectures/<name>.gin).
ARCHITECTURES = {
    "colt5": "colt5",
    "longt5_tglobal": "longt5_tglobal",
    "longt5_local": "longt5_local",
    "t5": "t5_1_1",
}
SIZES = ("tiny", "base", "large", "xl")


def model_file(kind: str, size: str) -> str:
  """`models/<architecture>_<size>.gin` of an encoder kind ('colt5', 't5', ...) and size."""
  if kind not in ARCHITECTURES:
    raise ValueError(f"Unknown encoder kind {kind!r}; expected one of {list(ARCHITECTURES)}")
  if size not in SIZES:
    raise ValueError(f"Unknown model size {size!r}; expected one of {list(SIZES)}")
  return f"models/{ARCHITECTURES[kind]}_{size}.gin"


@contextlib.contextmanager
def parsed(
    gin_files: Sequence[str],
    bindings: Sequence[str] = (),
    search_paths: Sequence[str] | None = None,
) -> Iterator[None]:
  """Parses `gin_files` then `bindings` (as the CLIs do) for the duration of the block.

  Args:
    gin_files: e.g. `["models/colt5_base.gin"]`, found in `search_paths`.
    bindings: gin bindings, e.g. `["NUM_ENCODER_LAYERS = 1"]`.
    search_paths: default: the CLIs' (the current directory and the repository's configs/).
  """
  if search_paths is None:
    search_paths = gin_utils.FLAGS["gin_search_paths"].default
  gin.clear_config()
  try:
    gin_utils.parse_gin_flags(search_paths, gin_files, bindings, finalize_config=False)
    yield
  finally:
    gin.clear_config()


def build(configurable: Any, **overrides: Any) -> Any:
  """`configurable` (a class or function gin binds, e.g. `network.Encoder`) called with
  the parsed configuration's bindings, `overrides` taking precedence."""
  return gin.get_configurable(configurable)(**overrides)


def macro(name: str) -> Any:
  """The value of the gin macro `name` in the parsed configuration.

  Raises:
    ValueError: the configuration defines no such macro.
  """
  try:
    return gin.query_parameter(f"%{name}")
  except ValueError:
    raise ValueError(f"The gin configuration defines no macro {name}") from None


def model_from_gin(name: str = "MODEL") -> Any:
  """Evaluates the gin macro `name` (default t5x's `MODEL`) of the parsed configuration.

  Raises:
    ValueError: when the configuration does not define the macro.
  """
  try:
    gin.query_parameter(f"{name}/macro.value")
  except ValueError:
    raise ValueError(
        f"The gin configuration defines no {name} macro; pass a model file, e.g. "
        "--gin_file=models/colt5_base.gin"
    ) from None
  # A macro is gin's `macro(value)` configurable in the macro's scope: calling it there
  # evaluates the bound value (`@model.EncoderDecoderModel()`) as gin would.
  with gin.config_scope(name):
    return gin.get_configurable("gin.macro")()


def frozen(name: str = "MODEL") -> Any:
  """The gin macro `name` of the parsed configuration, evaluated into plain Python.

  What `model_from_gin(name)` gives, except that no gin-configured callable is left inside:
  a factory bound by reference (`@attention.SelfAttention`, called by a flax module when it
  is traced) is normally gin's wrapper, which reads the bindings at call time, so the
  configuration must stay live until everything is compiled. Here each such reference is
  replaced by `functools.partial(<the class or function>, **<its bindings>)`, recursively,
  so the result keeps working after `parsed` clears gin. Callers' keyword arguments still
  take precedence over the bindings, as with gin's wrapper. One difference: a value a
  factory's binding evaluates (`capacity = @routing.RoutingCapacity()`) is evaluated once,
  here, not at each call of the factory (the same for immutable values like that one).

  Scopes follow gin: a scoped reference (`@encoder/mlp.GatedMlp`, `%MACRO`, which is
  `@MACRO/gin.macro()`) reads its bindings in exactly its scope; an unscoped evaluated one
  (`@X()`) in the scope where it is evaluated; an unscoped factory in none (flax calls it
  when it traces, outside any scope).

  Raises:
    ValueError: the configuration defines no such macro, or a binding it reaches is
      `gin.REQUIRED` (named).
  """
  try:
    bindings = gin.get_bindings(f"{name}/gin.macro", resolve_references=False)
  except ValueError:
    bindings = {}
  if "value" not in bindings:
    raise ValueError(f"The gin configuration defines no {name} macro")
  return _frozen(bindings["value"], [name], what=f"%{name}")


def _frozen(value: Any, scopes: list[str], what: str) -> Any:
  """`value` with every gin reference in it replaced by plain partials (see `frozen`)."""
  if isinstance(value, gin.config.ConfigurableReference):
    value = _frozen_reference(value, scopes)
  if value is gin.REQUIRED:
    raise ValueError(f"{what} is gin.REQUIRED and no gin file or binding sets it")
  if isinstance(value, list):
    return [_frozen(item, scopes, what) for item in value]
  if isinstance(value, tuple) and not hasattr(value, "_fields"):
    return tuple(_frozen(item, scopes, what) for item in value)
  if isinstance(value, dict):
    return {key: _frozen(item, scopes, f"{what}[{key!r}]") for key, item in value.items()}
  return value


def _frozen_reference(reference: Any, scopes: list[str]) -> Any:
  configurable = reference.configurable
  if configurable.selector in ("gin.constant", "gin.singleton"):
    return copy.deepcopy(reference)  # gin evaluates these from its own tables, now
  # gin calls a scoped reference in exactly its scopes, an unscoped one in the scopes
  # active at the call: those of the binding being evaluated, none later (at trace time).
  if reference.scopes:
    own_scopes = list(reference.scopes)
  else:
    own_scopes = list(scopes) if reference.evaluate else []
  bindings = gin.get_bindings(
      "/".join([*own_scopes, configurable.selector]), resolve_references=False
  )
  if configurable.wrapped is gin.config.macro:
    return _frozen(bindings["value"], own_scopes, f"%{'/'.join(own_scopes)}")
  kwargs = {
      key: _frozen(item, own_scopes, f"{configurable.selector}.{key}")
      for key, item in bindings.items()
  }
  if reference.evaluate:
    return configurable.wrapped(**kwargs)
  return functools.partial(configurable.wrapped, **kwargs)
