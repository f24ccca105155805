"""The train-cost benchmark runs end to end on a tiny model and writes its documented outputs.

No timing assertions: this only checks that the script works and its JSON keeps its schema.
"""

import json
import os

import pytest

from kforcing_jax.bench import train_cost

# Slow tier (-m 'not slow' skips it): times real training steps.
pytestmark = pytest.mark.slow

KINDS = {"ar_step", "rollout", "distill_step", "forward_efficient", "forward_dense"}
ROW_KEYS = {"kind", "seq_len", "k", "batch", "seconds", "min_seconds", "compile_s", "first_call_s",
            "times", "reps", "loadavg_1m"}


def test_train_cost_main_writes_json_and_png(tmp_path, capsys):
  out = str(tmp_path / "bench")
  train_cost.main(["--out", out, "--seq_lens", "16", "--ks", "2", "--batch", "2",
                   "--d_model", "32", "--n_layers", "1", "--n_heads", "2", "--vocab", "64",
                   "--reps", "1"])
  printed = capsys.readouterr().out
  assert "Train step cost" in printed and "Student forward" in printed

  with open(os.path.join(out, "train_cost.json")) as f:
    result = json.load(f)
  assert {"machine", "settings", "rows"} <= set(result)
  assert {"device_kind", "platform", "cpu_count"} <= set(result["machine"])
  assert result["settings"]["seq_lens"] == [16] and result["settings"]["ks"] == [2]
  rows = result["rows"]
  assert {r["kind"] for r in rows} == KINDS
  assert len(rows) == 1 + 4  # one AR step, then for k=2: rollout, distill, 2 forwards
  for r in rows:
    assert ROW_KEYS <= set(r), r["kind"]
    assert r["seq_len"] == 16 and r["batch"] == 2 and r["seconds"] > 0
  for r in rows:
    if r["kind"] == "distill_step":
      assert {"teacher_k", "ratio_to_ar", "budget_ar_steps", "ratio_to_budget",
              "ratio_to_model"} <= set(r)
      assert r["teacher_k"] == (0 if r["k"] == 1 else r["k"] // 2)
    if r["kind"] == "forward_efficient":
      assert r["speedup_vs_dense"] > 0
  assert os.path.getsize(os.path.join(out, "train_cost.png")) > 0
