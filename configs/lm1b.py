"""The paper's LM1B setting: 12 layers, d=768, 12 heads, L=128, bert-base-uncased vocabulary.

Needs internet once (TFDS lm1b download, tokenizer download) and accelerators:
  python -m kforcing_jax.train --config configs/lm1b.py --workdir gs://BUCKET/lm1b \
      --config.data.tfds_data_dir=gs://BUCKET/tfds
Expect (paper, 500K steps at batch 512 on 8 H100): AR teacher validation NLL ~3.0 nats/token.
Recipe (spec section 4): AdamW lr 1e-4 constant, betas 0.9/0.999, eps 1e-6, no weight decay,
clip 1.0, EMA 0.999, no dropout.
"""

from kforcing_jax.config_base import base_config


def get_config():
  c = base_config()
  c.stages = "teacher"
  c.model.d_model = 768
  c.model.n_layers = 12
  c.model.n_heads = 12
  c.model.dtype = "bfloat16"  # The paper used fp16 mixed precision; bf16 on TPU/H100.
  c.data.source = "tfds"
  c.data.tfds_name = "lm1b"
  c.data.tokenizer = "bert-base-uncased"
  c.seq_len = 128
  c.batch_size = 512
  c.optim.lr = 1e-4
  c.optim.schedule = "constant"
  c.optim.ema_decay = 0.999
  c.train.num_steps = 500_000
  c.train.log_every = 100
  c.train.eval_every = 5_000
  c.train.eval_batches = 16
  c.train.ckpt_every = 5_000
  c.train.keep_checkpoints = 3
  return c
