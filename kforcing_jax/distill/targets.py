"""Distillation targets and the student loss (spec section 4), for one stage.

A stage distils a frozen teacher (the AR model, or a PFLM(k_t)) into a PFLM(k_s) student:
  AR teacher      -> k_s rounds of inverse-CDF sampling (k_s = 1 is the paper's stage 1);
  PFLM(k_t)       -> R = k_s / k_t rounds of argmax rollout (R = 2: the paper's self-forcing);
  noise_inversion -> real data tokens as targets, z drawn inside their CDF bins (PTP baseline).
Targets are computed inside the jitted step under stop_gradient; the teacher gets no gradient
and no optimizer state.
"""

import dataclasses

import jax
import jax.numpy as jnp

from kforcing_jax.distill import losses, rollout, sampling
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.model import pflm as pflm_lib


# Soft targets (config.distill.cdf_blur) live on the target id and this many ids either side:
# in the frequent ids a blur of +- 0.01 spans a few of them; in the rare tail it is cut at +- 128.
BLUR_RADIUS = 128


@dataclasses.dataclass(frozen=True)
class StageSpec:
  student_k: int
  teacher_k: int  # 0 = the AR teacher
  target: str = "self_forcing"  # or "noise_inversion" (see stage_spec for "ar_rollout")
  tau_min: float = 1.0  # config.distill.tau_min / tau_max / greedy_share
  tau_max: float = 1.0
  greedy_share: float = 0.0
  tau_one_share: float = 0.0  # config.distill.tau_one_share
  cdf_blur: float = 0.0  # config.distill.cdf_blur
  own_prefix: float = 0.0  # config.distill.own_prefix


def stage_spec(stage: str, prev: str, target: str, tau: tuple[float, ...] = (1., 1., 0., 0.),
               cdf_blur: float = 0.0, own_prefix: float = 0.0) -> tuple[StageSpec, str]:
  """(spec, the stage whose frozen weights make the targets) of distillation stage `stage`.

  self_forcing: the previous stage makes the targets (the paper's chain); ar_rollout: the AR
  teacher makes them by k-round inverse-CDF rollout whatever the previous stage is, which then
  only initialises the student (a curriculum without drift along the chain); noise_inversion:
  real tokens, z from the AR teacher's CDF. tau: (tau_min, tau_max, greedy_share[,
  tau_one_share]).
  """
  from kforcing_jax.config import check as config_check

  k = config_check.stage_k(stage)
  teacher_k = 0 if target == "ar_rollout" else config_check.stage_k(prev)
  # Only an AR teacher's inverse-CDF has bins to blur: a PFLM teacher's argmax rollout and
  # noise inversion's real tokens keep one-hot targets.
  ar_targets = teacher_k == 0 and target != "noise_inversion"
  spec = StageSpec(student_k=k, teacher_k=teacher_k,
                   target="self_forcing" if target == "ar_rollout" else target,
                   tau_min=tau[0], tau_max=tau[1], greedy_share=tau[2],
                   tau_one_share=tau[3] if len(tau) > 3 else 0.0,
                   cdf_blur=cdf_blur if ar_targets else 0.0,
                   own_prefix=own_prefix if ar_targets else 0.0)
  return spec, config_check.TEACHER if target == "ar_rollout" else prev


def sequence_tau(spec: StageSpec, key: jax.Array, b: int) -> float | jax.Array:
  """Each sequence's temperature: uniform on [tau_min, tau_max] (exactly 1 with probability
  tau_one_share), or 0 (the greedy rollout) with probability greedy_share; a plain number when
  the stage trains at one temperature (so a one-temperature stage compiles exactly as before
  the ranges existed)."""
  if spec.tau_min == spec.tau_max and spec.greedy_share == 0:
    return spec.tau_min
  ku, kg = jax.random.split(key)
  tau = jax.random.uniform(ku, (b,), jnp.float32, spec.tau_min, spec.tau_max)
  if spec.tau_one_share:  # its own stream, so stages without it draw as before
    one = jax.random.uniform(jax.random.fold_in(ku, 1), (b,)) < spec.tau_one_share
    tau = jnp.where(one, 1.0, tau)
  return jnp.where(jax.random.uniform(kg, (b,)) < spec.greedy_share, 0.0, tau)


def make_targets(spec: StageSpec, teacher, tokens_BxN: jax.Array, z_BxNxK: jax.Array,
                 u_BxNxK: jax.Array, own_BxNxK: jax.Array | None = None,
                 mix_BxN: jax.Array | None = None, tau: float | jax.Array = 1.0):
  """(targets (B, N, k), weights (B, N, k), z the student sees (B, N, k), soft targets or None):
  soft targets, (ids, weights) on the BLUR_RADIUS ids either side of each target, only with
  spec.cdf_blur > 0 (an AR teacher's rollout). own_BxNxK / mix_BxN: the AR teacher's rollout
  continues from own_BxNxK in the windows where mix_BxN (spec.own_prefix). tau: the
  temperature, a number or per sequence (`sequence_tau`)."""
  b, n, k = z_BxNxK.shape
  ones = jnp.ones((b, n, k), jnp.float32)
  if spec.target == "noise_inversion":
    # Window (t, j) targets the real token x_(t+1+j); its z lies in that token's CDF bin under
    # q(. | x_<=t+j). Offsets running past the sequence end have no target (weight 0).
    logits_BxNxV = sampling.transformed_logits(teacher(tokens_BxN), tau)
    idx_NxK = jnp.arange(n)[:, None] + jnp.arange(k)[None, :]  # position of the predicting state
    valid_NxK = idx_NxK + 1 < n
    idx_NxK = jnp.minimum(idx_NxK, n - 2)
    targets = tokens_BxN[:, idx_NxK + 1]
    z = sampling.invert_noise(logits_BxNxV[:, idx_NxK], targets, u_BxNxK)
    return targets, ones * valid_NxK, z, None
  if spec.teacher_k == 0:
    prefix = dict(prefix_BxNxR=own_BxNxK, mix_BxN=mix_BxN)
    if spec.cdf_blur > 0:
      targets, soft = rollout.ar_rollout(teacher, tokens_BxN, z_BxNxK, tau,
                                         blur=(spec.cdf_blur, BLUR_RADIUS), **prefix)
      return targets, ones, z_BxNxK, soft
    return (rollout.ar_rollout(teacher, tokens_BxN, z_BxNxK, tau, **prefix), ones, z_BxNxK,
            None)
  targets = rollout.pflm_rollout(teacher, tokens_BxN, z_BxNxK, spec.teacher_k, tau)
  return targets, ones, z_BxNxK, None


def window_scores(student: pflm_lib.PFLM, tokens_BxN, z_BxNxK, targets_BxNxK,
                  tau: float = 1.0, soft=None, with_argmax: bool = False):
  """Per-window (NLL, argmax hit) of the student against targets, each (B, N, K); with soft
  targets also the per-window cross-entropy against them (the training loss's terms); with
  with_argmax, last, the argmax ids themselves (evaluation's miss anatomy)."""
  return logit_scores(student.noise_logits(tokens_BxN, z_BxNxK, tau), targets_BxNxK, soft,
                      with_argmax)


def logit_scores(logits, targets_BxNxK, soft=None, with_argmax: bool = False):
  """`window_scores` from the student's window logits (B, N, K, V)."""
  nll = losses.token_nll(logits, targets_BxNxK)
  pred = logits.argmax(-1)
  out = (nll, (pred == targets_BxNxK).astype(jnp.float32))
  if soft is not None:
    out += (losses.soft_token_nll(logits, *soft),)
  return out + (pred,) if with_argmax else out


def student_loss(student: pflm_lib.PFLM, tokens_BxN, z_BxNxK, targets_BxNxK, weights_BxNxK,
                 tau: float = 1.0, soft=None):
  """Cross-entropy averaged over positions and offsets, against the soft targets (ids, weights)
  when given; per-offset NLL_j / acc_j (always against the one-hot targets) and acc_all."""
  scores = window_scores(student, tokens_BxN, z_BxNxK, targets_BxNxK, tau, soft)
  return summarize_windows(*scores[:2], weights_BxNxK, *scores[2:])


def summarize_windows(nll_BxNxK, hit_BxNxK, weights_BxNxK, train_nll_BxNxK=None):
  """(loss, aux) of `student_loss` from per-window scores; the loss averages train_nll (default
  nll)."""
  nll, hit, w = nll_BxNxK, hit_BxNxK, weights_BxNxK
  per_offset = lambda x: (x * w).sum((0, 1)) / jnp.maximum(w.sum((0, 1)), 1.0)
  train = nll if train_nll_BxNxK is None else train_nll_BxNxK
  loss = (train * w).sum() / jnp.maximum(w.sum(), 1.0)
  full = (w.min(-1) > 0).astype(jnp.float32)
  aux = {"acc_all": (hit.min(-1) * full).sum() / jnp.maximum(full.sum(), 1.0)}
  nll_j, acc_j = per_offset(nll), per_offset(hit)
  for j in range(nll.shape[-1]):
    aux[f"nll_{j + 1}"] = nll_j[j]
    aux[f"acc_{j + 1}"] = acc_j[j]
  return loss, aux


def make_loss_fn(spec: StageSpec, student_graphdef, teacher_graphdef):
  """loss_fn(params, tokens, key, teacher_params) for `train_step.make_train_step`."""

  def loss_fn(params, tokens_BxN, key, teacher_params):
    b, n = tokens_BxN.shape
    kz, ku = jax.random.split(key)
    z = jax.random.uniform(kz, (b, n, spec.student_k), jnp.float32)
    u = jax.random.uniform(ku, (b, n, spec.student_k), jnp.float32)
    tau = sequence_tau(spec, jax.random.fold_in(key, 2), b)
    teacher = model_lib.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
    student = model_lib.merge(student_graphdef, params)
    if spec.own_prefix > 0:
      # The student's own decisions on this z as the prefix: the argmax of the same forward
      # the loss differentiates (targets carry no gradient), so no second student pass. (z is
      # unchanged: own_prefix excludes noise inversion, the one target that moves z.)
      logits = student.noise_logits(tokens_BxN, z, tau)
      own = jax.lax.stop_gradient(logits.argmax(-1).astype(jnp.int32))
      mix = jax.random.uniform(jax.random.fold_in(key, 1), (b, n)) < spec.own_prefix
      targets, weights, _, soft = jax.lax.stop_gradient(
          make_targets(spec, teacher, tokens_BxN, z, u, own, mix, tau))
    else:
      targets, weights, z, soft = jax.lax.stop_gradient(
          make_targets(spec, teacher, tokens_BxN, z, u, tau=tau))
      logits = student.noise_logits(tokens_BxN, z, tau)
    scores = logit_scores(logits, targets, soft)
    return summarize_windows(*scores[:2], weights, *scores[2:])

  return loss_fn
