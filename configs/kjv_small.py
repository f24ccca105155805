"""The default's recipe with a 5x longer k4 stage (2400 steps, not 480) and one-hot targets: the
budget that comes closest to the fidelity goals (NLL_j vs the AR teacher's targets below its
data NLL at every offset, Gen-PPL within 0.77-1.3x, unigram entropy within 10%).

Run (offline, 2 CPU cores):
  python -m kforcing_jax.train --config configs/kjv_small.py --workdir runs/kjv_small
  python -m kforcing_jax.evaluate --workdir runs/kjv_small --out runs/kjv_small/eval.json \
      --num_prompts 32 --max_new_tokens 64
Measured on a 2-core machine (2026-12-04): 61 min wall, peak memory 2.3 GB (teacher 5.4 min,
draft 2.0 min, k4 53.3 min). k4 validation against the AR teacher's targets after 2400 steps
2.35 / 3.68 / 4.26 / 4.43 (teacher data NLL 4.17). evaluate, k4@k4: NLL_j 2.43 / 3.77 / 4.32 /
4.42 vs the teacher's data NLL 4.34 (below it at offsets 1-3, +0.08 at offset 4), Gen-PPL 78.8
vs 74.3 (1.06x, within the goal), unigram entropy 3.22 vs 3.66 (0.88x, the goal is 0.90x),
rep_2 0.104 (teacher 0.043), all on 16 validation rows (`--val_seqs 16`, the default then).
On 128 rows (the default since 2026-12-05; scored on the same recipe with an EMA of the weights,
which ends within 0.004 nats of the raw weights) the gaps to the data NLL are -1.87 / -0.56 /
-0.03 / +0.20 (standard error 0.04), Gen-PPL 0.94x, entropy 0.87x. The Gen-PPL goal is met;
offset 4 and the entropy are not.
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
  # One-hot targets, as measured above (kjv_tiny.py's soft targets, distill.cdf_blur=0.01, came
  # later and are not yet measured at this budget).
  c.distill.cdf_blur = 0.0
  return c
