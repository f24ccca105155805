"""Teacher rollouts that make distillation targets: R rounds inside one `jax.lax.scan`.

The context stream never sees window tokens, so its per-layer (k, v) are computed ONCE and
reused by every round. A PFLM teacher's round runs the window stream over a fixed buffer of W
slots per context position (the tokens produced so far, then this round's noise), masking slots
not yet in use, so one compiled body serves every round. The AR teacher's round computes only
its one new slot per window, reading the earlier slots' (k, v) from a window cache.
"""

import jax
import jax.numpy as jnp

from kforcing_jax.model import transformer as model_lib
from kforcing_jax.model import pflm as pflm_lib
from kforcing_jax.distill import sampling


def pflm_rollout(teacher: pflm_lib.PFLM, tokens_BxN: jax.Array, z_BxNxRK: jax.Array, k: int,
                 tau: float | jax.Array = 1.0) -> jax.Array:
  """A PFLM(k) teacher rolled out R = z.shape[-1] / k rounds -> argmax targets (B, N, R*k).

  Round r's noise tokens (slots r*k..r*k+k-1, positions t+r*k+1..) see the context (staircase),
  every token produced in earlier rounds of their window, and earlier noise of their round;
  produced tokens are fed back as real tokens at their positions. R=2 is the paper's
  "double forward" self-forcing step.
  """
  b, n, w = z_BxNxRK.shape
  if w % k:
    raise ValueError(f"rollout window {w} is not a multiple of the teacher's k={k}")
  _, ctx_kvs = teacher.context_pass(tokens_BxN)
  noise_x = teacher.noise_encoder(z_BxNxRK, tau).astype(model_lib.RESIDUAL_DTYPE)
  slot_W = jnp.arange(w)

  def one_round(produced_BxNxW, r):
    x = jnp.where((slot_W < r * k)[:, None], teacher.embed(produced_BxNxW), noise_x)
    h = teacher.window_pass(ctx_kvs, x, valid_W=slot_W < (r + 1) * k)
    h_r = jax.lax.dynamic_slice_in_dim(h, r * k, k, axis=2)
    y_BxNxK = teacher.logits(h_r).argmax(-1).astype(jnp.int32)
    return jax.lax.dynamic_update_slice_in_dim(produced_BxNxW, y_BxNxK, r * k, axis=2), None

  # tau (a number or per sequence (B,)) reaches only the teacher's noise encoder.
  produced, _ = jax.lax.scan(one_round, jnp.zeros((b, n, w), jnp.int32), jnp.arange(w // k))
  return produced


def ar_rollout(teacher: model_lib.Transformer, tokens_BxN: jax.Array, z_BxNxR: jax.Array,
               tau: float | jax.Array = 1.0, with_logits: bool = False,
               blur: tuple[float, int] | None = None, prefix_BxNxR: jax.Array | None = None,
               mix_BxN: jax.Array | None = None):
  """An AR teacher as a k=1 inverse-CDF sampler, rolled out R rounds -> targets (B, N, R), and
  with_logits: also the logits / tau each round sampled from (B, N, R, V), float32; or
  blur=(sigma, radius): also each target's soft version (`sampling.blurred_window`: ids and
  weights, each (B, N, R, 2 radius + 1)), made round by round so no (B, N, R, V) tensor is kept.
  prefix_BxNxR (with mix_BxN, bool): in the windows where mix_BxN, round r >= 1 feeds
  prefix[..., :r] back instead of the rollout's own y_0..y_(r-1) (distill.own_prefix: the
  student's argmax tokens), so y_r continues that prefix.

  Round 0 samples from the context's own logits; round r >= 1 feeds y_0..y_(r-1) back as real
  tokens at positions t+1..t+r and samples from the hidden state of y_(r-1). R = 1 gives the
  stage-1 (AR -> PFLM(1)) targets; R = k distils AR -> PFLM(k) in one stage.
  tau: the temperature, a number or per sequence (B,); 0 = the teacher's greedy rollout (its
  soft targets are one-hot and its logits are at temperature 1).
  """
  b, n, rounds = z_BxNxR.shape
  if isinstance(tau, (int, float)):
    greedy, scale = None, None
    logits_at = lambda h: sampling.transformed_logits(teacher.logits(h), tau)
  else:  # per sequence: 1 / tau scales the d-wide state, not the V-wide logits (cheaper)
    tau = jnp.asarray(tau, jnp.float32)
    greedy = (tau == 0)[:, None]
    scale = jnp.where(tau == 0, 1.0, 1.0 / jnp.where(tau == 0, 1.0, tau))[:, None, None]
    logits_at = lambda h: teacher.logits(h, scale)

  def sample(logits, z):
    """logits at the temperature (greedy rows at 1) -> tokens (and soft targets)."""
    if greedy is None:
      y = sampling.sample(logits, z, 0.0 if tau == 0 else 1.0)
    else:
      y = jnp.where(greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32),
                    sampling.inverse_cdf(logits, z))
    if blur is not None:
      ids, w = sampling.blurred_window(logits, z, y, *blur)
      if greedy is not None or tau == 0:
        one_hot = (jnp.arange(w.shape[-1]) == blur[1]).astype(w.dtype)
        w = jnp.broadcast_to(one_hot, w.shape) if greedy is None else jnp.where(
            greedy[..., None], one_hot, w)
      return y, (ids, w)
    return y, (logits if with_logits else None)

  h_ctx, ctx_kvs = teacher.context_pass(tokens_BxN)
  logits0 = logits_at(h_ctx)
  y0, extra0 = sample(logits0, z_BxNxR[..., 0])
  produced = jnp.zeros((b, n, rounds), jnp.int32).at[..., 0].set(y0)
  extra = with_logits or blur is not None
  if rounds == 1:
    return (produced, jax.tree.map(lambda x: x[:, :, None], extra0)) if extra else produced
  w = rounds - 1  # window slots hold y_0 .. y_(R-2)

  def one_round(carry, r):
    # Round r feeds y_(r-1) at window slot r-1; the earlier slots' (k, v) are in the cache.
    produced_BxNxR, cache = carry
    y_prev = jax.lax.dynamic_slice_in_dim(produced_BxNxR, r - 1, 1, axis=2)
    if prefix_BxNxR is not None:
      given = jax.lax.dynamic_slice_in_dim(prefix_BxNxR, r - 1, 1, axis=2)
      y_prev = jnp.where(mix_BxN[..., None], given, y_prev)
    h, cache = teacher.window_pass(ctx_kvs, teacher.embed(y_prev), cache=cache, start=r - 1)
    z_r = jax.lax.dynamic_index_in_dim(z_BxNxR, r, axis=2, keepdims=False)
    y, extra_r = sample(logits_at(h[:, :, 0]), z_r)
    produced_BxNxR = jax.lax.dynamic_update_index_in_dim(produced_BxNxR, y, r, axis=2)
    return (produced_BxNxR, cache), extra_r

  (produced, _), rest = jax.lax.scan(
      one_round, (produced, teacher.init_window_cache(b, n, w)), jnp.arange(1, rounds))
  if not extra:
    return produced
  stacked = jax.tree.map(lambda first, later: jnp.concatenate([first[None], later], axis=0),
                         extra0, rest)
  return produced, jax.tree.map(lambda x: jnp.moveaxis(x, 0, 2), stacked)
