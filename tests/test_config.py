"""Every config file validates; every bad value fails with a message naming its field."""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from kforcing_jax.config import base as config_base
from kforcing_jax.config import check as config_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def test_config_files_exist():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  assert {"kjv_tiny.py", "lm1b.py", "owt.py"} <= names


# The default targets one CPU: its k4 batch of 4 sequences splits over at most 4 data-parallel
# devices (more need --config.stage_overrides.k4.batch_size, a multiple of them).
MAX_DEVICES = {"kjv_tiny.py": 4}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_file_validates(path):
  c = load(path)
  config_check.validate(c, n_devices=MAX_DEVICES.get(os.path.basename(path), 8))
  config_check.validate(c, n_devices=1)
  if os.path.basename(path) in MAX_DEVICES:  # one device more is a clear error, naming the field
    with pytest.raises(config_check.ConfigError, match="config.stage_overrides.k4.batch_size"):
      config_check.validate(c, n_devices=8)
  with open(path) as f:
    head = f.read(400)
  assert "python -m kforcing_jax.train --config configs/" in head, "docstring must give the command"


BAD = [
    # (field path, value, n_devices, expected substring)
    ("batch_size", 30, 8, "config.batch_size: global batch 30 is not divisible by the data axis"),
    ("model.n_heads", 3, 8, "config.model.d_model: 128 is not divisible by model.n_heads=3"),
    ("mesh.model", 3, 8, "config.mesh.model: 3 does not divide the 8 available devices"),
    ("mesh.data", 2, 8, "config.mesh.data: mesh.data * mesh.model = 2 * 1 = 2, but there are 8"),
    ("stages", "teacher,k3x", 8, "config.stages: unknown stage 'k3x'"),
    ("stages", "", 8, "config.stages: is empty"),
    ("stages", "teacher,teacher", 8, "config.stages: repeats a stage"),
    ("data.source", "wikipedia", 8, "config.data.source: must be one of"),
    ("data.tokenizer", "sentencepiece", 8, "config.data.tokenizer: must be one of"),
    ("model.dtype", "float16", 8, "config.model.dtype: must be one of"),
    ("model.noise_max_freq", 0.0, 8, "config.model.noise_max_freq: must be > 0"),
    ("data.bpe_id_order", "alphabetical", 8, "config.data.bpe_id_order: must be one of"),
    ("distill.own_prefix", 1.5, 8, "config.distill.own_prefix: must be in [0, 1]"),
    ("optim.lr", 0.0, 8, "config.optim.lr: must be > 0"),
    ("optim.schedule", "linear", 8, "config.optim.schedule: must be 'constant' or 'cosine'"),
    ("optim.ema_decay", 1.0, 8, "config.optim.ema_decay: must be in [0, 1)"),
    ("optim.b2", 1.5, 8, "config.optim.b2: must be in [0, 1)"),
    ("optim.name", "sgd", 8, "config.optim.name: must be one of ('adamw', 'muon')"),
    ("optim.muon_beta", 1.0, 8, "config.optim.muon_beta: must be in [0, 1)"),
    ("train.num_steps", 0, 8, "config.train.num_steps: must be >= 1"),
    ("seq_len", 1, 8, "config.seq_len: must be >= 2"),
    ("train.head_bias_init", "normal", 8, "config.train.head_bias_init: must be one of"),
    ("distill.cdf_blur", 1.0, 8, "config.distill.cdf_blur: must be in [0, 1)"),
    ("distill.cdf_blur", -0.01, 8, "config.distill.cdf_blur: must be in [0, 1)"),
    ("distill.tau_min", 1.5, 8, "config.distill.tau_min: need 0 < tau_min <= tau_max"),
    ("distill.tau_min", 0.0, 8, "config.distill.tau_min: need 0 < tau_min <= tau_max"),
    ("distill.greedy_share", 1.0, 8, "config.distill.greedy_share: must be in [0, 1)"),
    ("data.val_fraction", 0.0, 8, "config.data.val_fraction: must be in (0, 1)"),
    ("model.vocab_size", 0, 8, "config.model.vocab_size: must be -1"),
    ("stages", "teacher,draft,draft", 8, "config.stages: repeats a stage"),
    ("stages", "draft,k4", 8, "config.stages: must start with 'teacher'"),
    ("stages", "teacher,k2,draft,k3", 8, "config.stages: k3 cannot follow k2"),
    ("stages", "teacher,k4_2", 8,
     "config.stages: k4_2 is phase 2 of k4 and must directly follow k4"),
    ("stages", "teacher,k4,k4_3", 8,
     "config.stages: k4_3 is phase 3 of k4 and must directly follow k4_2"),
    ("stages", "teacher,k2,k4,k2_2", 8, "config.stages: k2_2 is phase 2 of k2"),
    ("stages", "teacher,k4,k4_1", 8, "config.stages: unknown stage 'k4_1'"),
    ("stages", "teacher,k4,k4_2,k6", 8, "config.stages: k6 cannot follow k4_2"),
    ("draft.n_layers", 0, 8, "config.draft.n_layers: must be an int >= 1"),
    ("draft.d_model", 102, 8, "config.draft.d_model: 102 / draft.n_heads=2 must be an even"),
]


def test_draft_stage_sits_outside_the_chain():
  """A PFLM stage after the draft distils the stage before the draft; the draft is AR (k=0)."""
  names = config_check.parse_stages("teacher,k1,draft,k2")
  assert config_check.chain(names) == [(None, "teacher"), ("teacher", "k1"), ("k1", "draft"),
                                       ("k1", "k2")]
  assert config_check.stage_k("draft") == 0


def test_phase_stages_continue_their_window():
  """"k<n>_<p>" starts from the stage before it but makes its targets as "k<n>" does, with
  its own seed; the chain may go on from the last phase."""
  names = config_check.parse_stages("teacher,k1,k2,draft,k2_2,k2_3,k4")
  assert [config_check.stage_k(n) for n in names] == [0, 1, 2, 0, 2, 2, 4]
  assert config_check.chain(names)[4:] == [("k2", "k2_2"), ("k2_2", "k2_3"), ("k2_3", "k4")]
  assert [config_check.target_source(names, n) for n in ("k2", "k2_2", "k2_3", "k4")] == [
      "k1", "k1", "k1", "k2_3"]
  assert sorted(["k4", "k2_3", "teacher", "k2_2", "k2"], key=config_check.stage_order) == [
      "teacher", "k2", "k2_2", "k2_3", "k4"]
  c = config_base.base_config()
  assert [config_check.stage_config(c, n).seed for n in ("k2", "k2_2", "k2_3")] == [0, 1, 2]


def _set(c, field, value):
  *parents, leaf = field.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value


@pytest.mark.parametrize("field,value,n_devices,message", BAD, ids=[b[0] + "=" + str(b[1]) for b in BAD])
def test_bad_config_fails_with_clear_message(field, value, n_devices, message):
  c = load(os.path.join(ROOT, "configs", "kjv_tiny.py"))
  _set(c, field, value)
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(c, n_devices=n_devices)
  assert message in str(e.value)


def test_cross_field_cases():
  c = load(os.path.join(ROOT, "configs", "kjv_tiny.py"))
  c.mesh.model = 8
  with pytest.raises(config_check.ConfigError, match=r"config.model.n_heads: 4 heads are not "
                     r"divisible by the model axis \(mesh.model=8\)"):
    config_check.validate(c, n_devices=8)
  c = load(os.path.join(ROOT, "configs", "kjv_tiny.py"))
  c.data.source = "text_files"
  with pytest.raises(config_check.ConfigError, match="config.data.text_files: is empty"):
    config_check.validate(c, n_devices=1)
  c = load(os.path.join(ROOT, "configs", "kjv_tiny.py"))
  c.mesh.fsdp, c.mesh.model, c.mesh.data, c.batch_size = True, 1, 3, 33
  with pytest.raises(config_check.ConfigError, match="config.mesh.fsdp"):
    config_check.validate(c, n_devices=3)
  c = load(os.path.join(ROOT, "configs", "kjv_tiny.py"))
  with pytest.raises(config_check.ConfigError, match="not divisible by the 3 processes"):
    c.batch_size = 32
    config_check.validate(c, n_devices=8, process_count=3)


def test_cli_rejects_bad_config_before_compiling(tmp_path):
  """The entry point fails fast (no tokenizer, no data, no compile) and names the field."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "kforcing_jax.train", "--config", "configs/kjv_tiny.py",
       "--workdir", str(tmp_path / "w"), "--config.mesh.model=3"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "config.mesh.model: 3 does not divide the 8 available devices" in proc.stderr + proc.stdout
  assert not (tmp_path / "w" / "tokenizer.json").exists()


def test_cli_rejects_unknown_field(tmp_path):
  """A mistyped override is one line naming the field and the nearest existing one."""
  proc = subprocess.run(
      [sys.executable, "-m", "kforcing_jax.train", "--config", "configs/kjv_tiny.py",
       "--workdir", str(tmp_path / "w"), "--config.train.batch_size=0"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: config.train.batch_size: no such field; did you mean config.batch_size?"]


@pytest.mark.parametrize("args,message", [
    (["--config.optimizer.lr=1"], "config.optimizer.lr: no such field; did you mean "
                                  "config.optim.lr?"),
    (["--config.optim.lr=1e-3", "--config.stage_overrides.k4.optim.lrr=1"],
     "config.stage_overrides.k4.optim.lrr: no such field; did you mean "
     "config.stage_overrides.k4.optim.lr?"),
    (["--config.zzzzz=1"], "config.zzzzz: no such field"),
    (["--config.optim.lr=1e-3"], None),  # a valid override is not this check's business
], ids=["group", "stage_override", "no_suggestion", "valid"])
def test_unknown_override_names_the_nearest_field(args, message):
  from absl import flags
  from ml_collections import config_flags
  from kforcing_jax import cli

  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  argv = ["prog", "--config", os.path.join(ROOT, "configs", "kjv_tiny.py"), *args]
  assert cli.missing_config_file(argv, fv) is None
  assert cli.unknown_override(argv, fv) == message


def test_missing_config_file_is_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "kforcing_jax.train", "--config", "configs/nope.py:k=4",
       "--workdir", str(tmp_path / "w")],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: --config configs/nope.py:k=4: no such config file"]


def test_stage_overrides_merge_and_validate():
  c = load(os.path.join(ROOT, "configs", "kjv_tiny.py"))
  c.stage_overrides.k4.optim.lr = 3e-4
  c.stage_overrides.k4.batch_size = 16
  k4 = config_check.stage_config(c, "k4")
  assert (k4.optim.lr, k4.batch_size) == (3e-4, 16)
  assert config_check.stage_config(c, "teacher").optim.lr == c.optim.lr
  assert config_check.stage_steps(c, "k4") == c.stage_overrides.k4.train.num_steps
  config_check.validate(c, n_devices=8)


def test_command_line_sets_any_overridable_field_of_a_preset_stage():
  """Preset stages hold typed placeholders for every overridable field, so the command line can
  set fields the config file left alone (ml_collections cannot add a field there)."""
  from absl import flags
  from ml_collections import config_flags
  def parse(*overrides):
    argv = ["prog", "--config", os.path.join(ROOT, "configs", "kjv_tiny.py"), *overrides]
    fv = flags.FlagValues()  # config_flags reads the overrides from argv, as train.py does
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config

  c = parse("--config.stage_overrides.k4.optim.lr=1e-4",
            "--config.stage_overrides.k4.train.eval_every=80",
            "--config.stage_overrides.k2.optim.schedule=constant",
            "--config.stage_overrides.k8.batch_size=16")
  k4 = config_check.stage_config(c, "k4")
  # Set on the command line, from the file (warmup 154, batch 4), and unset (the base value).
  assert (k4.optim.lr, k4.train.eval_every, k4.optim.warmup_steps, k4.batch_size) == (
      1e-4, 80, 154, 4)
  assert k4.optim.b2 == c.optim.b2 and k4.train.log_every == c.train.log_every
  assert config_check.stage_config(c, "k2").optim.schedule == "constant"
  assert config_check.stage_config(c, "k8").batch_size == 16
  assert config_check.stage_config(c, "teacher").optim.lr == c.optim.lr
  config_check.validate(c, n_devices=4)
  with pytest.raises(flags.IllegalFlagValueError):  # typed: a string is not a float
    parse("--config.stage_overrides.k4.optim.lr=fast")
  # The README's phase-stage command line.
  c = parse("--config.stages=teacher,draft,k4,k4_2",
            "--config.stage_overrides.k4_2.train.num_steps=960",
            "--config.stage_overrides.k4_2.batch_size=4",
            "--config.stage_overrides.k4_2.optim.name=muon",
            "--config.stage_overrides.k4_2.optim.lr=2e-3",
            "--config.stage_overrides.k4_2.optim.warmup_steps=100")
  config_check.validate(c, n_devices=4)
  k4_2 = config_check.stage_config(c, "k4_2")
  assert (k4_2.seed, k4_2.batch_size, k4_2.optim.name, k4_2.optim.lr, k4_2.train.num_steps) == (
      c.seed + 1, 4, "muon", 2e-3, 960)


OVERRIDE_BAD = [
    # (stage, override dict, expected substring)
    ("k4", {"optim": {"warmup_steps": 500}}, "config.stage_overrides.k4.optim.warmup_steps: 500 "
     "warm-up steps do not fit in the stage's"),
    ("k4", {"optim": {"learning_rate": 1e-3}}, "config.stage_overrides.k4.optim.learning_rate: "
     "is not a optim field"),
    ("k4", {"model": {"d_model": 128}}, "config.stage_overrides.k4.model: cannot be set per stage"),
    ("k4", {"train": {"keep_checkpoints": 3}}, "config.stage_overrides.k4.train.keep_checkpoints"),
    ("k4", {"optim": {"lr": "fast"}}, "config.stage_overrides.k4.optim.lr: must be a float"),
    ("k4", {"optim": {"lr": -1.0}}, "config.stage_overrides.k4.optim.lr: must be > 0"),
    ("k4", {"optim": {"name": "lion"}}, "config.stage_overrides.k4.optim.name: must be one of"),
    ("k4", {"batch_size": 30}, "config.stage_overrides.k4.batch_size: global batch 30"),
    ("k_4", {"train": {"num_steps": 5}}, "config.stage_overrides.k_4: 'k_4' is not a stage name"),
]


@pytest.mark.parametrize("stage,over,message", OVERRIDE_BAD, ids=[m[2][:60] for m in OVERRIDE_BAD])
def test_bad_stage_override_fails_naming_the_field(stage, over, message):
  import ml_collections
  c = load(os.path.join(ROOT, "configs", "kjv_tiny.py"))
  c.stage_overrides[stage] = ml_collections.ConfigDict(over)
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(c, n_devices=8)
  assert message in str(e.value)


def test_warmup_longer_than_stage_fails_on_the_cli(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}  # the default's
  proc = subprocess.run(
      [sys.executable, "-m", "kforcing_jax.train", "--config", "configs/kjv_tiny.py",
       "--workdir", str(tmp_path / "w"), "--config.stage_overrides.k4.optim.warmup_steps=10000"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "config.stage_overrides.k4.optim.warmup_steps: 10000 warm-up steps" in proc.stderr + proc.stdout
  assert not (tmp_path / "w" / "tokenizer.json").exists()


def test_user_error_is_one_line_without_traceback(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "kforcing_jax.train", "--config", "configs/kjv_tiny.py",
       "--workdir", str(tmp_path / "w"), "--config.stage_overrides.k4.batch_size=0"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr and "libtpu" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "error: config.stage_overrides.k4.batch_size: must be >= 1")
