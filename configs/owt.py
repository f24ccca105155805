"""The paper's OpenWebText setting: 12 layers, d=768, 12 heads, L=1024, GPT-2 vocabulary.

Needs internet once (TFDS openwebtext download, GPT-2 tokenizer download) and accelerators:
  python -m kforcing_jax.train --config configs/owt.py --workdir gs://BUCKET/owt \
      --config.data.tfds_data_dir=gs://BUCKET/tfds
Expect (paper, 500K steps at batch 512 on 8 H100): a GPT-2-small-class teacher (Gen-PPL ~43
for AR samples). Recipe as configs/lm1b.py; the vocabulary is GPT-2's 50257 ids + 1 mask id.
"""

from kforcing_jax.config_base import base_config


def get_config():
  c = base_config()
  c.stages = "teacher"
  c.model.d_model = 768
  c.model.n_layers = 12
  c.model.n_heads = 12
  c.model.dtype = "bfloat16"
  c.data.source = "tfds"
  c.data.tfds_name = "openwebtext"
  c.data.tokenizer = "gpt2"
  c.data.val_fraction = 0.0005  # openwebtext has only a train split; hold out 0.05% of it.
  c.seq_len = 1024
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
