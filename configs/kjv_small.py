"""The embedded default's recipe with a 5x longer k4 stage: the budget at which the k4 student
is meant to meet its teacher on the fidelity goals (NLL_j against the AR teacher's targets below
the teacher's data NLL at every offset, Gen-PPL within 0.77-1.3x, unigram entropy within 10%).

Run (offline, 2 CPU cores):
  python -m kforcing_jax.train --config configs/kjv_small.py --workdir runs/kjv_small
  python -m kforcing_jax.evaluate --workdir runs/kjv_small --out runs/kjv_small/eval.json \
      --num_prompts 32 --max_new_tokens 64 --val_seqs 16
Measured on an idle 2-core machine: MEASURED_PENDING.
"""

import importlib.util
import os


def get_config():
  # kjv_tiny.py's own get_config (not a copy through to_dict, which would drop the typed
  # placeholders that let the command line set any stage_overrides field).
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kjv_tiny.py")
  spec = importlib.util.spec_from_file_location("kjv_tiny", path)
  kjv_tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(kjv_tiny)
  c = kjv_tiny.get_config()
  # Only the k4 stage differs from kjv_tiny.py: the teacher (300 steps) and draft are the same.
  k4 = c.stage_overrides.k4
  k4.train.num_steps = 2400
  k4.optim.warmup_steps = 240
  k4.train.eval_every = 200
  k4.train.ckpt_every = 400
  return c
