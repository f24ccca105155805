"""The MDLM objective (Sahoo et al. 2024) on the bidirectional backbone.

Continuous-time absorbing diffusion with the log-linear schedule: sigma(t) = -log(1 - t), so a
token is masked at time t with probability 1 - alpha_t = t. SUBS parameterisation: the model
never predicts the mask (its logit is -inf) and an unmasked input is carried over unchanged,
so only masked positions are scored. The negative ELBO per token is then

  E_t [ -alpha'_t / (1 - alpha_t) * sum over masked l of -log p(x_l | z_t) ] / L,
  with -alpha'_t / (1 - alpha_t) = 1 / t,

estimated with one t per sequence (antithetic over the batch: lower variance, same mean).
t is drawn from [T_MIN, 1]; the piece of the integral below T_MIN is negligible.

The token at position l is read from the backbone's output at l - 1 (`token_logits`), where
the AR head puts its next-token prediction: a stage initialised from the teacher starts from
its next-token predictions, now also seeing the (partly masked) future, as AR-to-diffusion
adaptations do (DiffuLLaMA, Dream). Position 0 is therefore never masked: it is the first
prompt token when decoding (the end-of-document id), and the bound covers positions 1..L-1,
the same tokens as the teacher's data NLL.

Decoding conditions on a clean prompt over a span shorter than a training sequence, so a share
of training sequences keeps a longer clean prefix (`prompt_share`) and a share is cut to a
random length (`cut_share`: the keys past the cut are invisible, `attention.span_mask`).
"""

import dataclasses

import jax
import jax.numpy as jnp

from kforcing_jax.model import transformer as model_lib

T_MIN = 1e-3  # The smallest diffusion time drawn (the weight 1 / t stays <= 1000).


@dataclasses.dataclass(frozen=True)
class MdlmSpec:
  """A stage's masking settings (config.mdlm). Validation uses prompt_share = cut_share = 0:
  the bound over whole sequences, comparable with the teacher's data NLL."""
  prompt_share: float = 0.0
  cut_share: float = 0.0


def mask_prob(t_B: jax.Array) -> jax.Array:
  """1 - alpha_t of the log-linear schedule (alpha_t = exp(-sigma(t)) = 1 - t)."""
  return t_B


def elbo_weight(t_B: jax.Array) -> jax.Array:
  """-alpha'_t / (1 - alpha_t) = 1 / t: the weight of a masked token's cross-entropy."""
  return 1.0 / t_B


def diffusion_times(key: jax.Array, b: int) -> jax.Array:
  """(B,) times on [T_MIN, 1], antithetic: one uniform shifted by i / B for row i."""
  u = (jax.random.uniform(key, ()) + jnp.arange(b, dtype=jnp.float32) / b) % 1.0
  return T_MIN + (1.0 - T_MIN) * u


@dataclasses.dataclass(frozen=True)
class Corrupted:
  """A noised batch: what the model sees and which positions count."""
  z_BxL: jax.Array  # tokens with the masked positions replaced by the mask id
  masked_BxL: jax.Array  # bool: masked (scored) positions
  scored_BxL: jax.Array  # bool: positions the bound covers (not prompt, not past the cut)
  t_B: jax.Array
  len_B: jax.Array  # each row's span [0, len_B)


def corrupt(spec: MdlmSpec, key: jax.Array, tokens_BxL: jax.Array, mask_id: int) -> Corrupted:
  """Draw t, the optional prompt and cut, and the mask of each sequence."""
  b, n = tokens_BxL.shape
  kt, km, kp, kc, kpl, kcl = jax.random.split(key, 6)
  t_B = diffusion_times(kt, b)
  pos_L = jnp.arange(n, dtype=jnp.int32)
  len_B = jnp.full((b,), n, jnp.int32)
  if spec.cut_share > 0:  # uniform on 2..L: at least one prompt token and one to predict
    cut_B = jax.random.randint(kcl, (b,), 2, n + 1, jnp.int32)
    len_B = jnp.where(jax.random.uniform(kc, (b,)) < spec.cut_share, cut_B, len_B)
  prompt_B = jnp.ones((b,), jnp.int32)  # position 0 is always clean (`token_logits`)
  if spec.prompt_share > 0:  # uniform on 1..len-1
    plen_B = 1 + jnp.floor(jax.random.uniform(kpl, (b,)) * (len_B - 1)).astype(jnp.int32)
    prompt_B = jnp.where(jax.random.uniform(kp, (b,)) < spec.prompt_share, plen_B, 1)
  scored = (pos_L[None, :] >= prompt_B[:, None]) & (pos_L[None, :] < len_B[:, None])
  masked = scored & (jax.random.uniform(km, (b, n)) < mask_prob(t_B)[:, None])
  z = jnp.where(masked, mask_id, tokens_BxL)
  return Corrupted(z, masked, scored, t_B, len_B)


def token_logits(model: model_lib.Transformer, z_BxL: jax.Array, pad_B: jax.Array | None = None,
                 len_B: jax.Array | None = None, n_tokens: int | None = None,
                 mass_to_BxL: jax.Array | None = None):
  """Logits (B, n, V) of the tokens at the last n = n_tokens positions (default all L), each
  read from the bidirectional output one position earlier. With n = L, row 0 (no position
  before it; never masked) is a placeholder of zeros. mass_to_BxL: also the attention share of
  those same outputs on the marked positions, (logits, mass (B, n)) (Transformer's)."""
  n = z_BxL.shape[1]
  want = n if n_tokens is None else n_tokens
  out = model.bidirectional_logits(z_BxL, pad_B, len_B, n_out=min(want + 1, n),
                                   mass_to_BxL=mass_to_BxL)
  shift = lambda a: (jnp.concatenate([jnp.zeros_like(a[:, :1]), a[:, :-1]], axis=1)
                     if want == n else a[:, :-1])
  return shift(out) if mass_to_BxL is None else (shift(out[0]), shift(out[1]))


def subs_log_probs(logits_BxLxV: jax.Array, z_BxL: jax.Array, mask_id: int) -> jax.Array:
  """SUBS: log-probabilities (B, L, V) with the mask's logit at -inf (never predicted) and each
  unmasked input carried over (log 1 on it, -inf elsewhere)."""
  logits = logits_BxLxV.astype(jnp.float32).at[..., mask_id].set(-jnp.inf)
  logp = jax.nn.log_softmax(logits, axis=-1)
  ids_V = jnp.arange(logits.shape[-1], dtype=z_BxL.dtype)
  carried = jnp.where(ids_V == z_BxL[..., None], 0.0, -jnp.inf)
  return jnp.where((z_BxL != mask_id)[..., None], carried, logp)


def elbo(logits_BxLxV: jax.Array, tokens_BxL: jax.Array, c: Corrupted, mask_id: int):
  """(negative ELBO per scored token, aux): aux has the plain cross-entropy and accuracy of the
  masked positions and the share of scored positions masked."""
  logp = subs_log_probs(logits_BxLxV, c.z_BxL, mask_id)
  nll_BxL = -jnp.take_along_axis(logp, tokens_BxL[..., None], axis=-1)[..., 0]
  nll_BxL = jnp.where(c.masked_BxL, nll_BxL, 0.0)  # carried-over positions cost exactly 0
  n_scored = jnp.maximum(c.scored_BxL.sum(), 1)
  n_masked = jnp.maximum(c.masked_BxL.sum(), 1)
  bound = (elbo_weight(c.t_B)[:, None] * nll_BxL).sum() / n_scored
  hit = (logp.argmax(-1) == tokens_BxL) & c.masked_BxL
  aux = {"masked_nll": nll_BxL.sum() / n_masked, "masked_acc": hit.sum() / n_masked,
         "mask_rate": c.masked_BxL.sum() / n_scored}
  return bound, aux


def make_loss_fn(spec: MdlmSpec, graphdef):
  """loss_fn(params, tokens, key, frozen) for `train_step.make_train_step` (no teacher)."""

  def loss_fn(params, tokens_BxL, key, frozen):
    del frozen
    model = model_lib.merge(graphdef, params)
    mask_id = model.cfg.mask_id
    c = corrupt(spec, key, tokens_BxL, mask_id)
    return elbo(token_logits(model, c.z_BxL, len_B=c.len_B), tokens_BxL, c, mask_id)

  return loss_fn
