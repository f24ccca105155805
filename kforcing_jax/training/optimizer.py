"""AdamW + global-norm clipping + lr schedule (spec section 4), built from `config.optim`."""

import ml_collections
import optax


def lr_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  warmup = optax.linear_schedule(0.0, optim.lr, max(optim.warmup_steps, 1))
  if optim.schedule == "constant":
    main = optax.constant_schedule(optim.lr)
  elif optim.schedule == "cosine":
    main = optax.cosine_decay_schedule(optim.lr, max(num_steps - optim.warmup_steps, 1),
                                       alpha=optim.final_lr_frac)
  else:
    raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {optim.schedule!r}")
  if optim.warmup_steps <= 0:
    return main
  return optax.join_schedules([warmup, main], [optim.warmup_steps])


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  parts = []
  if optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(optax.adamw(lr_schedule(optim, num_steps), b1=optim.b1, b2=optim.b2,
                           eps=optim.eps, weight_decay=optim.weight_decay))
  return optax.chain(*parts)
