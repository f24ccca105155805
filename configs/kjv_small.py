"""The default's recipe with a 5x longer k4 stage (2400 steps of 8 sequences; the default: 960
of 4): the budget that comes closest to the fidelity goals (NLL_j vs the AR teacher's targets
below its data NLL at every offset, Gen-PPL within 0.77-1.3x, unigram entropy within 10%).

Run (offline, 2 CPU cores):
  python -m kforcing_jax.train --config configs/kjv_small.py --workdir runs/kjv_small
  python -m kforcing_jax.evaluate --workdir runs/kjv_small --out runs/kjv_small/eval.json \
      --num_prompts 32 --max_new_tokens 64
Wall time: ~67-70 min on an idle 2-core machine with the default's 4 heads (estimated: the
measured run of 2026-12-06 resumed from a step-400 checkpoint and shared the cores for most of
its k4 stage; alone, its k4 steps took ~1.48 s, so 2400 steps ~59 min, plus the teacher's ~5.4
and the draft's ~2.0; peak 2.4 GB). k4 validation against the AR teacher's targets after 2400
steps: 2.05 / 3.42 / 4.03 / 4.25 (teacher data NLL 4.17 on those rows; 2 heads: 2.11 / 3.46 /
4.11 / 4.33). Evaluated on 128 rows (docs/results/kjv_small_eval.json): gaps to the teacher's
data NLL -2.19 / -0.83 / -0.26 / +0.03 (standard error 0.04), Gen-PPL 68.0 vs 76.2 (0.89x),
unigram entropy 3.287 vs 3.651 (0.900x), rep_2 0.091; with evaluate's --seed 1
(docs/results/kjv_small_eval_seed1.json): offset 4 +0.07, Gen-PPL 0.86x, entropy 0.884x.
Gen-PPL and offsets 1-3 meet the goals; the entropy sits at the 0.90x line; offset 4 is
0.03-0.07 above the teacher's data NLL, not below it (README, "Does the student match its
teacher?"). With 2 heads (the config until 2026-12-06; docs/results/kjv_small_2heads_eval.json):
-2.12 / -0.76 / -0.16 / +0.11, Gen-PPL 0.95x, entropy 0.899x.
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
  # Only the k4 stage differs from kjv_tiny.py (same teacher and draft, bit for bit).
  k4 = c.stage_overrides.k4
  # 2400 steps of 8 sequences, not kjv_tiny.py's half batch: at this budget 4800 steps of 4 (the
  # same sequences, 1.1x the time) ended level (2026-12-06, 2 heads, same teacher; evaluate on
  # 128 rows: gaps -2.12 / -0.77 / -0.16 / +0.11, Gen-PPL 0.92x, entropy 0.884x; validation
  # 2.13 / 3.45 / 4.13 / 4.30; docs/results/kjv_small_k4_4800x4_eval.json).
  k4.batch_size = 8
  k4.train.num_steps = 2400
  k4.optim.warmup_steps = 240
  k4.train.eval_batches = 4
  k4.train.eval_every = 200
  k4.train.ckpt_every = 400
  return c
