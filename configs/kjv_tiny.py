"""The embedded default: a tiny AR teacher on the King James Bible, distilled AR -> k1 -> k2 -> k4.

Run (offline, 2 CPU cores):
  python -m kforcing_jax.train --config configs/kjv_tiny.py --workdir runs/kjv_tiny
Expect: teacher validation loss from ~9.0 (uniform over 8192 ids) to ~4.3 nats/token after 300
steps; k4 per-offset validation NLL ~0.7 / 0.9 / 2.1 / 2.1 after 25 steps. Measured wall time:
85 minutes on a 2-core machine shared with other jobs (teacher ~600 tokens/s there; ~1.5-2.5k
tokens/s on an idle machine). metrics.jsonl, tensorboard/ and loss_curve.png in the work dir.
Shrink for a smoke test: --config.train.stage_steps=teacher=20,k1=5,k2=5,k4=5 --config.batch_size=8
"""

from kforcing_jax.config_base import base_config


def get_config():
  c = base_config()
  # The paper's schedule: AR teacher, then self-forcing distillation to k=1, 2 and 4.
  c.stages = "teacher,k1,k2,k4"
  c.model.d_model = 256
  c.model.n_layers = 4
  c.model.n_heads = 4
  c.data.source = "kjv"
  c.data.tokenizer = "bpe"
  c.data.bpe_vocab_size = 8192
  c.seq_len = 128
  c.batch_size = 32
  c.optim.lr = 1e-3  # A tiny model trained for minutes tolerates (and needs) a higher lr.
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 50
  c.train.num_steps = 300
  # Distillation steps cost more (the student sees N*k noise tokens, the teacher rolls out).
  # Each stage has its own steps and schedule.
  c.stage_overrides.teacher = dict(train=dict(num_steps=300))
  c.stage_overrides.k1 = dict(train=dict(num_steps=80), optim=dict(warmup_steps=10))
  c.stage_overrides.k2 = dict(train=dict(num_steps=40), optim=dict(warmup_steps=5))
  c.stage_overrides.k4 = dict(train=dict(num_steps=25), optim=dict(warmup_steps=5))
  c.train.log_every = 10
  c.train.eval_every = 50
  c.train.eval_batches = 4
  c.train.ckpt_every = 100
  return c
