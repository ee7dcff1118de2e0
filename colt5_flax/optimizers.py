"""Optimizers and learning-rate schedules of T5 and CoLT5 (docs/paper.md, Training).

Gin picks an optimizer factory and a schedule separately, because the trainer logs the
learning rate of every step:

    train_script.train.optimizer = @optimizers.adafactor          # a factory, no ()
    train_script.train.learning_rate_schedule = @optimizers.rsqrt_schedule()

Pretraining (CoLT5 §4): Adafactor with the T5.1.1 inverse-square-root schedule (0.01 for
10k steps, then 1/√step). Fine-tuning: constant 0.001.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def adafactor(
    learning_rate: optax.ScalarOrSchedule,
    *,
    decay_rate: float = 0.8,
    clipping_threshold: float | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    momentum: float | None = None,
    factored: bool = True,
    min_dim_size_to_factor: int = 128,
    epsilon: float = 1e-30,
    weight_decay_rate: float | None = None,
    max_grad_norm: float | None = None,
) -> optax.GradientTransformation:
  """Adafactor with T5's settings (Shazeer & Stern 2018; t5x's `adafactor.Adafactor`).

  Defaults are T5's: factored second moments for matrices whose two largest axes are
  >= 128, second-moment decay `1 - (step + 1)^-0.8`, no momentum (no first moment kept),
  updates clipped to RMS 1.0, and steps scaled by the parameter's RMS (at least 1e-3),
  which makes the learning rate a relative step size.

  Args:
    learning_rate: a float or an optax schedule of the step.
    max_grad_norm: clip the gradient's global norm to this first (None: no clipping;
      T5 uses none with Adafactor).
  Returns:
    the optax transformation.
  """
  optimizer = optax.adafactor(
      learning_rate=learning_rate,
      min_dim_size_to_factor=min_dim_size_to_factor,
      decay_rate=decay_rate,
      multiply_by_parameter_scale=multiply_by_parameter_scale,
      clipping_threshold=clipping_threshold,
      momentum=momentum,
      weight_decay_rate=weight_decay_rate,
      eps=epsilon,
      factored=factored,
  )
  return _with_gradient_clipping(optimizer, max_grad_norm)


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay), with global-norm clipping (1.0 by default)."""
  optimizer = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  return _with_gradient_clipping(optimizer, max_grad_norm)


def _with_gradient_clipping(optimizer, max_grad_norm):
  if max_grad_norm is None:
    return optimizer
  if max_grad_norm <= 0:
    raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
  return optax.chain(optax.clip_by_global_norm(max_grad_norm), optimizer)


# -- Schedules (functions of the 0-based optimizer step) ------------------------------


def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> optax.Schedule:
  """T5.1.1's inverse square root: `base / sqrt(max(step, warmup_steps))`.

  With T5's defaults (base 1.0, 10k steps) the rate is 0.01 for the first 10k steps and
  then decays as 1/√step (t5x: `factors='constant * rsqrt_decay'`).
  """
  if warmup_steps < 1:
    raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    return base_learning_rate * jnp.reciprocal(jnp.sqrt(jnp.maximum(step, warmup_steps)))

  return schedule


def constant_schedule(learning_rate: float = 0.001) -> optax.Schedule:
  """A constant rate (CoLT5 fine-tuning: 0.001)."""
  return optax.constant_schedule(learning_rate)


def warmup_cosine_schedule(
    peak_learning_rate: float,
    warmup_steps: int,
    decay_steps: int,
    *,
    initial_learning_rate: float = 0.0,
    end_learning_rate: float = 0.0,
) -> optax.Schedule:
  """Linear warmup to `peak_learning_rate` over `warmup_steps`, then cosine decay.

  `decay_steps` counts the whole schedule, warmup included (optax's convention); after it
  the rate stays at `end_learning_rate`.
  """
  if not 0 <= warmup_steps <= decay_steps:
    raise ValueError(
        f"need 0 <= warmup_steps <= decay_steps, got warmup_steps={warmup_steps}, "
        f"decay_steps={decay_steps}"
    )
  return optax.warmup_cosine_decay_schedule(
      init_value=initial_learning_rate,
      peak_value=peak_learning_rate,
      warmup_steps=warmup_steps,
      decay_steps=decay_steps,
      end_value=end_learning_rate,
  )
