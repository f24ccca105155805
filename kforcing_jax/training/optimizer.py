"""AdamW (spec section 4) or Muon, + global-norm clipping + lr schedule, from `config.optim`."""

import jax
import ml_collections
import optax
from optax.contrib import MuonDimensionNumbers as _Dims

# Muon orthogonalises each weight matrix's update as (reduction axes) x (output axes); other axes
# are batch axes (q, k and v separately; each of them across all heads). Everything else (the
# token embedding and output head, biases, norms) takes AdamW's update.
_MUON_DIMS = {
    "attn_qkv": _Dims(reduction_axis=0, output_axis=(2, 3)),  # (d, 3, heads, head_dim)
    "attn_q": _Dims(reduction_axis=0, output_axis=(1, 2)),  # (d, heads, head_dim)
    "attn_kv": _Dims(reduction_axis=0, output_axis=(2, 3)),  # (d, 2, kv_heads, head_dim)
    "attn_out": _Dims(reduction_axis=(0, 1), output_axis=2),  # (heads, head_dim, d)
    "mlp_in": _Dims(), "mlp_gate": _Dims(), "mlp_out": _Dims(), "combined_proj": _Dims(),
}


def muon_dims(params) -> dict:
  """Per parameter: its Muon dimension numbers, or None for the AdamW part."""
  def dims(path, leaf):
    name = getattr(path[-1], "key", None)
    spec = _MUON_DIMS.get(name)
    return spec if spec is not None and leaf.ndim >= 2 else None
  return jax.tree_util.tree_map_with_path(dims, params)


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
  lr = lr_schedule(optim, num_steps)
  if optim.name == "muon":
    # consistent_rms=0.2 scales the orthogonalised updates to AdamW's typical RMS, so one lr
    # (and schedule) serves both parts (Liu et al. 2025, "Muon is scalable"). optax builds the
    # other part as AdamW with Nesterov momentum and Muon's eps (1e-8), not optim.eps.
    parts.append(optax.contrib.muon(
        lr, beta=optim.muon_beta, weight_decay=optim.weight_decay, adam_b1=optim.b1,
        adam_b2=optim.b2, adam_weight_decay=optim.weight_decay,
        muon_weight_dimension_numbers=muon_dims, consistent_rms=0.2))
  else:
    parts.append(optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                             weight_decay=optim.weight_decay))
  return optax.chain(*parts)
