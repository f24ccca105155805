"""The paper's OpenWebText setting: 12 layers, d=768, 12 heads, L=1024, GPT-2 vocabulary,
and its distillation schedule AR teacher -> PFLM k=1 -> k=2 -> k=4, 500K steps per stage.

Check it compiles for a 32-device mesh without the hardware (fake CPU devices, no data):
  python -m kforcing_jax.train --config configs/owt.py --workdir /tmp/owt_dry --dry_run
Run it (needs internet once: TFDS openwebtext download, GPT-2 tokenizer download; see
launch/README.md; the work dir must be shared by all hosts, e.g. a gcsfuse mount):
  python -m kforcing_jax.train --config configs/owt.py --workdir /mnt/bucket/runs/owt \
      --config.data.tfds_data_dir=/mnt/bucket/tfds
Expect (paper, 500K steps per stage at batch 512 on 8 H100): a GPT-2-small-class teacher
(Gen-PPL ~43 for AR samples); k=4 Gen-PPL 25.0 (less diverse text: report entropy too). Recipe
as configs/lm1b.py; the vocabulary is GPT-2's 50257 ids + 1 added mask id (50257).
Parameters: 85.0M in the blocks, 38.6M token embedding, 38.6M output layer (untied), + 5.9M
noise encoder in the PFLM stages.
"""

from kforcing_jax.config.base import base_config


def get_config():
  c = base_config()
  c.stages = "teacher,k1,k2,k4"
  c.model.d_model = 768
  c.model.n_layers = 12
  c.model.n_heads = 12
  c.model.vocab_size = 50258  # GPT-2 + [MASK] (fixed so the dry run needs no download)
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
  c.train.num_steps = 500_000  # Per stage.
  c.train.log_every = 100
  c.train.eval_every = 5_000
  c.train.eval_batches = 16
  c.train.ckpt_every = 5_000
  c.train.keep_checkpoints = 3
  return c
