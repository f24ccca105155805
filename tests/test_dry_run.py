"""Dry run of the paper-scale configs: parameter counts, AOT compile, bad meshes (no hardware)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from kforcing_jax.training import aot
from kforcing_jax.config import check as config_check
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.model import pflm as pflm_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def expected_counts(v: int, d: int, n_layers: int, mlp_ratio: int = 4) -> dict:
  """Closed-form parameter counts from the spec's architecture (section 2)."""
  f = mlp_ratio * d
  block = d + 3 * d * d + d * d + d + (d * f + f) + (f * d + d)  # norms, qkv, out, mlp
  noise = (2 * d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
  return {"embedding": v * d, "blocks": n_layers * block, "output_layer": d + d * v + v,
          "noise_encoder": noise}


@pytest.mark.parametrize("name,vocab", [("lm1b", 30522), ("owt", 50258)])
def test_paper_configs_match_the_spec_parameter_counts(name, vocab):
  """~85M in the blocks (the paper's "~100M" model) and a 5.9M noise encoder at d=768."""
  cfg = load_config(name)
  config_check.validate(cfg, 32)
  assert config_check.parse_stages(cfg.stages) == ["teacher", "k1", "k2", "k4"]
  assert (cfg.batch_size, cfg.train.num_steps, cfg.optim.lr, cfg.optim.ema_decay) == (
      512, 500_000, 1e-4, 0.999)
  model_cfg = aot.model_config(cfg)
  assert model_cfg.vocab_size == vocab
  _, params = model_lib.split_params(pflm_lib.abstract_pflm(model_cfg))
  groups = aot.param_groups(params)
  assert groups == expected_counts(vocab, 768, 12)
  assert round(groups["blocks"] / 1e6, 1) == 85.0
  assert round(groups["noise_encoder"] / 1e6, 1) == 5.9


def test_bad_mesh_fails_before_compiling_with_the_field_to_change():
  cfg = load_config("lm1b")
  cfg.mesh.model = 5
  with pytest.raises(config_check.ConfigError, match=r"config.mesh.model: 5 does not divide the "
                                                      r"32 available devices"):
    aot.dry_run(cfg, "", 32)
  cfg.mesh.model = 8  # divides 32 devices but not the 12 heads
  with pytest.raises(config_check.ConfigError, match=r"config.model.n_heads: 12 heads are not "
                                                      r"divisible by the model axis"):
    aot.dry_run(cfg, "", 32)
  cfg.mesh.model, cfg.batch_size = 2, 500  # data axis 16 does not divide 500
  with pytest.raises(config_check.ConfigError, match=r"config.batch_size: global batch 500"):
    aot.dry_run(cfg, "", 32)


@pytest.mark.slow  # compiles three stages in a fresh process of 32 fake devices
def test_dry_run_cli_compiles_a_shrunken_paper_config(tmp_path):
  """The real entry point (`--dry_run` creates its own fake devices in a fresh process) on the
  LM1B config shrunk to 1 layer, d=64: teacher, a k2 distillation stage and its phase 2 k2_2
  (which distils the AR teacher as k2 does), mesh (4, 2)."""
  shrink = {"model.d_model": 64, "model.n_layers": 1, "model.n_heads": 2,
            "stages": "teacher,k2,k2_2",
            "batch_size": 16, "seq_len": 16, "mesh.model": 2}
  cmd = [sys.executable, "-m", "kforcing_jax.train", f"--config={REPO}/configs/lm1b.py",
         f"--workdir={tmp_path}", "--dry_run", "--dry_run_devices=8",
         *[f"--config.{k}={v}" for k, v in shrink.items()]]
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # The entry point must create the devices itself.
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  text = out.stdout
  assert "Dry run on 8 fake CPU devices, mesh data=4 model=2" in text, text
  report = json.load(open(tmp_path / "dry_run.json"))
  assert [s["stage"] for s in report["stages"]] == ["teacher", "k2", "k2_2"]
  want = expected_counts(30522, 64, 1)
  teacher, k2, k2_2 = report["stages"]
  # Same student, same (AR) teacher, same targets: a phase compiles to the same step.
  for key in ("params", "frozen_bytes_per_device", "flops_per_step"):
    assert k2_2[key] == k2[key], key
  assert teacher["param_groups"] == {k: v for k, v in want.items() if k != "noise_encoder"}
  assert k2["param_groups"] == want and k2["params"] == sum(want.values())
  assert f"{k2['params']:,d} params" in text
  for s in report["stages"]:
    assert s["argument_bytes"] > 0 and s["peak_bytes_estimate"] >= s["argument_bytes"]
    assert s["flops_per_step"] > 0
  # Params + 2 Adam moments + EMA, f32, replicated over 'data': the 'model' axis halves the
  # sharded tensors, so one device holds between 1/2 and all of 4 copies.
  total = 4 * 4 * teacher["params"]
  assert total / 2 < teacher["state_bytes_per_device"] < total
  assert k2["frozen_bytes_per_device"] > 0 and teacher["frozen_bytes_per_device"] == 0
  # No data, no tokenizer: the work dir holds only the report.
  assert sorted(os.listdir(tmp_path)) == ["dry_run.json"]
