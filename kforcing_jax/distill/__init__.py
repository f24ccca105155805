"""Distillation: inverse-CDF sampling, the k-round teacher rollout, stage targets and losses."""
