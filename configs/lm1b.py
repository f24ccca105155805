"""The paper's LM1B setting: 12 layers, d=768, 12 heads, L=128, bert-base-uncased vocabulary,
and its distillation schedule AR teacher -> PFLM k=1 -> k=2 -> k=4, 500K steps per stage.

Check it compiles for a 32-device mesh without the hardware (fake CPU devices, no data):
  python -m kforcing_jax.train --config configs/lm1b.py --workdir /tmp/lm1b_dry --dry_run
Run it (needs internet once: TFDS lm1b download, tokenizer download; see launch/README.md for
pods and clusters; the work dir must be shared by all hosts, e.g. a gcsfuse mount):
  python -m kforcing_jax.train --config configs/lm1b.py --workdir /mnt/bucket/runs/lm1b \
      --config.data.tfds_data_dir=/mnt/bucket/tfds
Expect (paper, 500K steps per stage at batch 512 on 8 H100): AR teacher validation NLL ~3.0
nats/token; at k=4 per-offset NLL ~0.9/1.9/2.7/2.9 after 200K steps; Gen-PPL AR 104.8, k=2
107.2, k=4 127.6. Recipe (spec section 4): AdamW lr 1e-4 constant, betas 0.9/0.999, eps 1e-6,
no weight decay, clip 1.0, EMA 0.999, no dropout. Parameters: 85.0M in the blocks, 23.4M token
embedding, 23.5M output layer (untied), + 5.9M noise encoder in the PFLM stages.
"""

from kforcing_jax.config.base import base_config


def get_config():
  c = base_config()
  c.stages = "teacher,k1,k2,k4"
  c.model.d_model = 768
  c.model.n_layers = 12
  c.model.n_heads = 12
  c.model.vocab_size = 30522  # bert-base-uncased, [MASK] = 103 (fixed so the dry run needs no download)
  c.model.dtype = "bfloat16"  # The paper used fp16 mixed precision; bf16 on TPU/H100.
  c.data.source = "tfds"
  c.data.tfds_name = "lm1b"
  c.data.tokenizer = "bert-base-uncased"
  c.seq_len = 128
  c.batch_size = 512
  c.optim.lr = 1e-4
  c.optim.schedule = "constant"
  c.optim.ema_decay = 0.999
  c.train.num_steps = 500_000  # Per stage.
  c.train.log_every = 100
  c.train.eval_every = 5_000
  c.train.eval_batches = 16
  c.train.ckpt_every = 5_000
  c.train.keep_checkpoints = 3
  return c
