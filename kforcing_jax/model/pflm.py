"""The push-forward LM (PFLM): the backbone plus a noise encoder; k tokens per forward pass.

Parameters are the teacher's plus `noise_encoder`, so a student starts as an exact copy of its
teacher's backbone and head (`init_from`).
"""


import jax
from flax import nnx

from kforcing_jax.model import transformer as model_lib
from kforcing_jax.model.noise_encoder import NoiseEncoder


class PFLM(model_lib.Transformer):

  def __init__(self, cfg: model_lib.ModelConfig, rngs: nnx.Rngs):
    super().__init__(cfg, rngs)
    self.noise_encoder = NoiseEncoder(cfg.d_model, rngs, cfg.noise_max_freq)

  def noise_logits(self, tokens_BxN: jax.Array, z_BxNxK: jax.Array, tau: float = 1.0,
                   dense: bool = False) -> jax.Array:
    """Training forward of window k = z.shape[-1]: logits (B, N, k, V); logits[:, t, j]
    predicts the token at position t+1+j from the context x_<=t and z_1..z_(j+1)."""
    noise_x = self.noise_encoder(z_BxNxK, tau)
    if dense:
      h = self.window_pass_dense(tokens_BxN, noise_x)
    else:
      _, kvs = self.context_pass(tokens_BxN)
      h = self.window_pass(kvs, noise_x)
    return self.logits(h)


def abstract_pflm(cfg: model_lib.ModelConfig) -> PFLM:
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: PFLM(cfg, nnx.Rngs(0)))


def stage_module(cfg: model_lib.ModelConfig, k: int):
  """(factory(rngs) -> module, abstract module) of a stage: the Transformer for k = 0 (the AR
  teacher and draft; the mdlm stage too, its cfg.attention "bidirectional"), else a PFLM of
  window k. The one place that maps a stage to its model class."""
  cls = model_lib.Transformer if k == 0 else PFLM
  abstract = model_lib.abstract_model(cfg) if k == 0 else abstract_pflm(cfg)
  return (lambda rngs: cls(cfg, rngs)), abstract


def init_from(teacher_params: dict, student_params: dict) -> dict:
  """Student params = the teacher's tensors wherever the teacher has them (all of the backbone
  and head; the noise encoder too when the teacher is itself a PFLM), else the fresh init.
  Student and teacher have the same blocks."""
  t_blocks, s_blocks = teacher_params["blocks"], student_params["blocks"]
  if len(s_blocks) != len(t_blocks):
    raise ValueError(f"a student of {len(s_blocks)} blocks cannot start from a teacher of "
                     f"{len(t_blocks)}")
  out = dict(student_params)
  for key, value in teacher_params.items():
    out[key] = value
  return out
