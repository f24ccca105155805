"""The fidelity study's bookkeeping: curves from metrics.jsonl, the target check, table and plot.
(The study itself trains for tens of minutes: `python -m experiments.fidelity_study`; its
registry of variants is research, outside the library and outside these tests.)"""

import json
import os
import subprocess
import sys

import pytest

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


def test_variant_config_applies_study_base_then_teacher_then_overrides():
  study = fidelity.Study(
      base=(("model.d_model", 256), ("optim.lr", 1e-4)),
      teachers={"t": (("model.d_model", 128),)},
      variants=[fidelity.Variant("v", "t", "teacher,k4",
                                 fidelity.stage_budget("k4", 40, 2e-3) + (("optim.lr", 3e-4),))])
  c = fidelity.variant_config(os.path.join(ROOT, "configs", "kjv_tiny.py"), study,
                              study.variants[0], "/out")
  assert (c.model.d_model, c.optim.lr, c.stages) == (128, 3e-4, "teacher,k4")
  k4 = c.stage_overrides.k4
  assert (k4.train.num_steps, k4.optim.lr, k4.optim.warmup_steps, k4.batch_size) == (40, 2e-3, 4, 8)
  assert c.data.tfds_data_dir == os.path.join("/out", "tfds_data")


def test_unknown_variant_is_one_clear_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.fidelity_study", "--out",
                         str(tmp_path), "--variants", "nope"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == "error: --variants: unknown ['nope']; see --list"
