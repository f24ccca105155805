"""The fidelity study's bookkeeping: curves from metrics.jsonl, the target check, table and plot.
(The study itself trains for tens of minutes: `python -m kforcing_jax.bench.fidelity`.)"""

import json
import os
import subprocess
import sys

import pytest

from kforcing_jax.config import check as config_check
from kforcing_jax.bench import fidelity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(nll, gen_ppl=100.0, entropy=3.0, data_nll=3.5):
  teacher = {"stage": "teacher", "k": 1, "method": "ar", "gen_ppl": 100.0, "entropy": 3.0,
             "rep_2": 0.05, "agree": 1.0, "data_nll": data_nll}
  student = {"stage": "k4", "k": 4, "method": "pflm", "gen_ppl": gen_ppl, "entropy": entropy,
             "rep_2": 0.06, "agree": 0.4,
             **{f"nll_{j + 1}": v for j, v in enumerate(nll)},
             **{f"acc_{j + 1}": 0.5 for j in range(len(nll))}}
  return [teacher, student]


@pytest.mark.parametrize("nll,gen_ppl,entropy,met", [
    ([1.0, 2.0, 3.0, 3.4], 110.0, 2.9, True),
    ([1.0, 2.0, 3.0, 3.6], 110.0, 2.9, False),   # offset 4 above the data NLL
    ([1.0, 2.0, 3.0, 3.4], 140.0, 2.9, False),   # Gen-PPL 1.4x the teacher's
    ([1.0, 2.0, 3.0, 3.4], 70.0, 2.9, False),    # 0.7x: too dull
    ([1.0, 2.0, 3.0, 3.4], 110.0, 2.6, False),   # entropy 13% below
])
def test_targets(nll, gen_ppl, entropy, met):
  s = fidelity.summary_row("v", _rows(nll, gen_ppl, entropy))
  assert s["targets_met"] is met
  assert s["gen_ppl_ratio"] == pytest.approx(gen_ppl / 100.0)


def test_curve_table_and_plot(tmp_path):
  lines = [
      {"stage": "teacher", "step": 10, "loss": 5.0, "elapsed_s": 30.0},
      {"stage": "k1", "step": 5, "loss": 4.0, "elapsed_s": 20.0},
      {"stage": "k2", "step": 5, "loss": 4.0, "elapsed_s": 40.0},
      {"stage": "k4", "step": 5, "loss": 4.0, "elapsed_s": 10.0},
      {"stage": "k4", "step": 5, "val_ar_loss": 4.0, "val_ar_nll_1": 3.0, "val_ar_nll_2": 4.0,
       "val_ar_nll_3": 4.5, "val_ar_nll_4": 4.5, "val_teacher_data_nll": 3.5, "elapsed_s": 12.0},
  ]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write("".join(json.dumps(x) + "\n" for x in lines))
  points, wall = fidelity.curve(str(tmp_path), ["teacher", "k1", "k2", "k4"])
  assert wall == {"teacher": 30.0, "k1": 20.0, "k2": 40.0, "k4": 12.0}
  assert len(points) == 1 and points[0]["distill_wall_s"] == pytest.approx(72.0)
  assert points[0]["nll_4"] == 4.5
  result = {"name": "chain", "distill_wall_s": 72.0, "curve": points,
            "summary": fidelity.summary_row("chain", _rows([3.0, 4.0, 4.5, 4.5]))}
  text = fidelity.table([result])
  assert "| chain | 1.2 min | 4 | 3.00 / 4.00 / 4.50 / 4.50 (3.50)" in text and "not met" in text
  assert text.rstrip().endswith("| not met | - |")  # no teacher reference points in these rows
  rows = _rows([3.0, 4.0, 4.5, 4.5])
  rows[0].update({f"{n}_{j}": 4.0 + j for n in ("blind", "prefix") for j in range(1, 5)})
  s = fidelity.summary_row("floors", rows)
  assert s["blind_4"] == 8.0 and s["prefix_2"] == 6.0
  assert "| 5.00 / 6.00 / 7.00 / 8.00 |" in fidelity.table([{**result, "summary": s}])
  fidelity.plot([result], str(tmp_path / "f.png"))
  assert os.path.getsize(tmp_path / "f.png") > 1000


def test_every_variant_is_a_valid_config():
  base = os.path.join(ROOT, "configs", "kjv_tiny.py")
  for v in fidelity.VARIANTS:  # built as the study builds them (STUDY_BASE included)
    c = fidelity._config(base, fidelity.TEACHERS[v.teacher] + (("stages", v.stages),) +
                         v.overrides, "/nonexistent")
    config_check.validate(c, n_devices=1)


def test_unknown_variant_is_one_clear_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "kforcing_jax.bench.fidelity", "--out",
                         str(tmp_path), "--variants", "nope"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode != 0
  assert "--variants: unknown ['nope']" in proc.stderr + proc.stdout
