"""How a stack of layers runs: remat policy, and a Python loop or one `nn.scan`.

`run_stack` is shared by the encoder and the decoder (`network.py`). With `scan_layers`
the layers' parameters are stacked along a leading 'layers' axis and XLA compiles one
layer instead of `num_layers`; the remat policy trades recomputation for activation
memory at long input lengths.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

# jax.checkpoint policies by the names gin uses (`REMAT_POLICY = 'dots_saveable'`).
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def run_stack(
    layer_cls,
    layer_kwargs: Mapping[str, Any],
    x,
    args: tuple[Any, ...],
    *,
    num_layers: int,
    scan_layers: bool,
    remat_policy: str,
    static_argnums: tuple[int, ...],
):
  """Runs `num_layers` of `layer_cls(**layer_kwargs)` on `x`, each called as `(x, *args)`.

  The layers are wrapped in remat (`remat_policy`) and, with `scan_layers`, in one
  `nn.scan` whose parameters are stacked along a leading 'layers' axis (submodule
  `layers`); otherwise they are `layers_0 ... layers_{n-1}`. `args` are the same for
  every layer. `static_argnums` counts `self` as 0 (flax's convention). Call it from the
  parent's compact method.
  """
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}")
  if remat_policy != "none":
    layer_cls = nn.remat(
        layer_cls,
        policy=REMAT_POLICIES[remat_policy],
        static_argnums=static_argnums,
        prevent_cse=not scan_layers,
    )
  if not scan_layers:
    for i in range(num_layers):
      x = layer_cls(**layer_kwargs, name=f"layers_{i}")(x, *args)
    return x

  body_layer_cls = layer_cls

  class _ScanBody(nn.Module):
    layer_kwargs: Mapping[str, Any]

    @nn.compact
    def __call__(self, x, *args):
      return body_layer_cls(**self.layer_kwargs, name="layer")(x, *args), None

  scanned = nn.scan(
      _ScanBody,
      variable_axes={"params": 0, "cache": 0, "intermediates": 0},
      split_rngs={"params": True, "dropout": True, "routing": True},
      in_axes=(nn.broadcast,) * len(args),
      length=num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )
  x, _ = scanned(layer_kwargs, name="layers")(x, *args)
  return x
