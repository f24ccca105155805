"""Fidelity study: how close do distilled students get to their AR teacher, per distillation budget?

  python -m kforcing_jax.bench.fidelity --out runs/fidelity [--variants single_k4,chain,...]

Each variant is a training chain on the embedded corpus (a base config plus field overrides).
Variants that share a teacher train it once (`<out>/teachers/<name>`) and start from a copy of
it (a finished stage is skipped), so they differ only in what follows the teacher. Per variant:
  curve  the final stage's validation NLL_j / acc_j against the ORIGINAL AR teacher's targets
         (`val_ar_*` in metrics.jsonl), against its steps and against the cumulative wall time of
         all distillation stages of the chain;
  eval   kforcing_jax.serving.quality on held-out prompts, decoding the final stage at its full window:
         teacher-scored Gen-PPL, unigram entropy, rep_2/rep_4, agreement with the AR rollout
         under identical uniforms, per-offset NLL_j / acc_j against AR targets; plus the teacher
         row (its own samples and data NLL).
Writes <out>/fidelity.json (rewritten after every variant), fidelity.md (the table) and
fidelity.png (curves), and prints the table. Re-running continues: finished variants are read
back from their work dirs and re-evaluated only if their evaluation is missing.
"""

import dataclasses
import json
import os
import shutil

from absl import flags

from kforcing_jax import cli

_OUT = flags.DEFINE_string("out", None, "Output directory (work dirs, JSON, table, PNG).")
_CONFIG = flags.DEFINE_string("config", "configs/kjv_tiny.py", "Base config file.")
_VARIANTS = flags.DEFINE_string("variants", "", "Comma-separated variant names ('' = all).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 32, "Held-out prompts per evaluation.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Completion length for sample metrics.")
_VAL_SEQS = flags.DEFINE_integer("val_seqs", 16, "Validation rows for per-offset metrics.")
_LIST = flags.DEFINE_bool("list", False, "Print the variants and exit.")
# --out is checked in main(), not with mark_flags_as_required: this module is imported by tests,
# and a required flag would break every other absl command line parsed in the same process.


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  teacher: str  # key of TEACHERS: the base-config fields the teacher is trained with
  stages: str
  overrides: tuple  # (dotted field, value) pairs applied after TEACHERS[teacher]
  note: str = ""


def _steps(stage: str, n: int, lr: float | None = None, warmup: int | None = None,
           batch: int | None = 8) -> tuple:
  """Overrides of one distillation stage: steps, lr, warm-up (default n/10) and batch size.
  Distillation steps cost ~5-7 teacher steps per sequence (N*k noise tokens plus the rollout),
  so at this scale a small batch and more steps learn more per minute."""
  out = [(f"stage_overrides.{stage}.train.num_steps", n)]
  if lr is not None:
    out.append((f"stage_overrides.{stage}.optim.lr", lr))
  out.append((f"stage_overrides.{stage}.optim.warmup_steps",
              warmup if warmup is not None else max(1, n // 10)))
  if batch is not None:
    out.append((f"stage_overrides.{stage}.batch_size", batch))
  return tuple(out)


# Every teacher and variant starts from the base config plus STUDY_BASE, so that a variant means
# the same when the default config changes: the study's reference point is the authors' noise
# encoder (noise_max_freq 1), the BPE trainer's id order, 4 layers of width 256, a teacher
# whose output bias starts at zero (the authors' initialisation), one-hot targets and AdamW.
STUDY_BASE = (("data.bpe_id_order", "merges"), ("model.noise_max_freq", 1.0),
              ("model.d_model", 256), ("model.n_heads", 4), ("model.n_layers", 4),
              ("train.head_bias_init", "zeros"), ("distill.cdf_blur", 0.0),
              ("stage_overrides.k4.optim.name", "adamw"),
              # The k4 stage's validation and checkpoint cadence before configs/kjv_tiny.py's k4
              # batch went from 8 to 4 (2026-12-06): 4 batches of 8 rows every 50 steps.
              ("stage_overrides.k4.train.eval_batches", 4),
              ("stage_overrides.k4.train.eval_every", 50),
              ("stage_overrides.k4.train.ckpt_every", 100))
# configs/kjv_tiny.py's k4 stage since 2026-12-06: soft targets and Muon.
_SOFT_MUON = (("distill.cdf_blur", 0.01), ("stage_overrides.k4.optim.name", "muon"))

# The embedded default's departures from STUDY_BASE as of 2026-12-02 (8192 ids by frequency,
# noise features to 1000 cycles); configs/kjv_tiny.py is now this at width 128 with a unigram
# output bias (default_d128_unigram).
DEFAULT = (("data.bpe_vocab_size", 8192), ("data.bpe_id_order", "frequency"),
           ("model.noise_max_freq", 1000.0))

# Teachers: the knobs that change the AR model itself (vocabulary size, id order, width, depth).
TEACHERS = {
    "v1024": (("data.bpe_vocab_size", 1024),),
    "v8192": (("data.bpe_vocab_size", 8192),),
    "v259": (("data.bpe_vocab_size", 259),),  # no merges: one id per byte (character-level)
    "v259_freq": (("data.bpe_vocab_size", 259), ("data.bpe_id_order", "frequency")),
    "v1024_freq": (("data.bpe_vocab_size", 1024), ("data.bpe_id_order", "frequency")),
    "v1024_d384": (("data.bpe_vocab_size", 1024), ("model.d_model", 384),
                   ("model.n_heads", 6)),
    # The embedded default's settings (configs/kjv_tiny.py), then the same at twice the depth
    # and 3/4 of the width (about the same parameters and step time).
    "default": DEFAULT,
    "default_l8": DEFAULT + (("model.n_layers", 8), ("model.d_model", 192), ("model.n_heads", 3)),
    # The default at half the width (configs/kjv_tiny.py since 2026-12-03): a d=128 step costs
    # about half a d=256 one, so the same wall time buys the k4 student ~3x the steps (and its
    # teacher is weaker).
    "default_d128": DEFAULT + (("model.d_model", 128), ("model.n_heads", 2)),
    # ... and its teacher starting at the unigram distribution (configs/kjv_tiny.py since
    # 2026-12-04): 300 steps then reach a lower data NLL, with less probability on rare ids.
    "default_d128_unigram": DEFAULT + (("model.d_model", 128), ("model.n_heads", 2),
                                       ("train.head_bias_init", "unigram")),
    # ... with 4 heads of 32 instead of 2 of 64 (configs/kjv_tiny.py since 2026-12-06): the same
    # teacher quality, and the student's window tokens get twice the attention lookups per layer.
    "default_d128_unigram_h4": DEFAULT + (("model.d_model", 128), ("model.n_heads", 4),
                                          ("train.head_bias_init", "unigram")),
    # ... with ids along a chain of similar tokens (data.bpe_id_order=similarity): the same
    # kind of teacher, a different z-to-token map (lower NLL_j, more repetitive samples).
    "default_d128_unigram_h4_sim": DEFAULT + (("model.d_model", 128), ("model.n_heads", 4),
                                              ("train.head_bias_init", "unigram"),
                                              ("data.bpe_id_order", "similarity")),
    # The default's settings at one id per byte, trained 1000 steps instead of 300 (~24 min):
    # a sharper teacher, to see whether the byte-level student's small gap survives it.
    "v259_long": DEFAULT + (("data.bpe_vocab_size", 259),
                            ("stage_overrides.teacher.train.num_steps", 1000),
                            ("stage_overrides.teacher.optim.warmup_steps", 50)),
}

# Budget unit: ~5 min of distillation on the 2-core CPU (120 k4 steps of batch 8); the chains
# split the same wall time between their stages. single_k4 runs twice as long, and every
# variant's curve shows its NLL_j along the way.
CHAIN = _steps("k1", 60) + _steps("k2", 40) + _steps("k4", 60)
VARIANTS = [  # in the order a default run of the study trains them (most telling first)
    Variant("single_k4", "v1024", "teacher,k4", _steps("k4", 240, 1e-3),
            "AR -> k4 in one stage (k-round inverse-CDF targets), 240 steps, lr 1e-3"),
    Variant("single_k4_120", "v1024", "teacher,k4", _steps("k4", 120, 1e-3),
            "AR -> k4, 120 steps, lr 1e-3"),
    Variant("chain", "v1024", "teacher,k1,k2,k4", CHAIN,
            "the paper's chain AR -> k1 -> k2 -> k4, self-forcing (60/40/60 steps)"),
    Variant("chain_ar_targets", "v1024", "teacher,k1,k2,k4",
            CHAIN + (("distill.target", "ar_rollout"),),
            "same chain, every stage on AR-teacher targets (previous stage = init only)"),
    Variant("noise_inversion", "v1024", "teacher,k4",
            _steps("k4", 120, 1e-3) + (("distill.target", "noise_inversion"),),
            "PTP baseline: real tokens as targets, z inverted inside their CDF bins, 120 steps"),
    Variant("single_k4_120_v8192", "v8192", "teacher,k4", _steps("k4", 120, 1e-3),
            "vocabulary 8192 instead of 1024 (its own teacher)"),
    Variant("chain_k1_heavy", "v1024", "teacher,k1,k2,k4",
            _steps("k1", 120) + _steps("k2", 30) + _steps("k4", 40),
            "chain with the budget moved to k1 (120/30/40 steps)"),
    Variant("single_k4_120_lr3e-3", "v1024", "teacher,k4", _steps("k4", 120, 3e-3),
            "AR -> k4, 120 steps, lr 3e-3"),
    Variant("single_k4_120_d384", "v1024_d384", "teacher,k4", _steps("k4", 120, 1e-3),
            "width 384 / 6 heads instead of 256 / 4 (its own teacher)"),
    Variant("single_k4_120_lr3e-4", "v1024", "teacher,k4", _steps("k4", 120, 3e-4),
            "AR -> k4, 120 steps, lr 3e-4"),
    Variant("single_k4_120_f1000", "v1024", "teacher,k4",
            _steps("k4", 120, 1e-3) + (("model.noise_max_freq", 1000.0),),
            "AR -> k4, 120 steps, noise features up to 1000 cycles over [0, 1] (authors: 1)"),
    Variant("single_k4_120_v259", "v259", "teacher,k4", _steps("k4", 120, 1e-3),
            "byte-level vocabulary (259 ids, its own teacher)"),
    Variant("single_k4_120_v259_f1000", "v259", "teacher,k4",
            _steps("k4", 120, 1e-3) + (("model.noise_max_freq", 1000.0),),
            "byte-level vocabulary, noise features up to 1000 cycles"),
    Variant("single_k4_120_v259_freq_f1000", "v259_freq", "teacher,k4",
            _steps("k4", 120, 1e-3) + (("model.noise_max_freq", 1000.0),),
            "byte-level, ids by frequency, noise features up to 1000 cycles"),
    Variant("single_k4_120_freq_f1000", "v1024_freq", "teacher,k4",
            _steps("k4", 120, 1e-3) + (("model.noise_max_freq", 1000.0),),
            "ids by frequency, noise features up to 1000 cycles"),
    Variant("single_k4_120_v8192_f1000", "v8192", "teacher,k4",
            _steps("k4", 120, 1e-3) + (("model.noise_max_freq", 1000.0),),
            "8192 ids (the default's vocabulary), noise features up to 1000 cycles"),
    Variant("default_k4", "default", "teacher,k4", _steps("k4", 160, 1e-3),
            "the embedded default's recipe: 8192 ids by frequency, noise features up to 1000 "
            "cycles, AR -> k4 for 160 steps"),
    Variant("default_k4_l8", "default_l8", "teacher,k4", _steps("k4", 160, 1e-3),
            "the default at 8 layers of width 192 (3 heads) instead of 4 of 256 (own teacher)"),
    Variant("default_k1_300_k4_100", "default", "teacher,k1,k4",
            _steps("k1", 300, 1e-3) + _steps("k4", 100, 1e-3)
            + (("distill.target", "ar_rollout"),),
            "the default's settings as a chain AR -> k1 (300 steps) -> k4 (100), both on "
            "AR-teacher targets"),
    Variant("default_k4_600", "default", "teacher,k4",
            _steps("k4", 600, 1e-3) + (("stage_overrides.k4.train.eval_every", 100),),
            "the default's recipe with the k4 stage 3.75x longer (600 steps, ~37 min)"),
    Variant("v259_long_k4_900", "v259_long", "teacher,k4",
            _steps("k4", 900, 1e-3) + (("stage_overrides.k4.train.eval_every", 100),),
            "bytes with the default's other settings, the longest budget measured: teacher "
            "1000 steps, AR -> k4 900 steps (~35 min)"),
    Variant("default_d128_k4_480", "default_d128", "teacher,k4", _steps("k4", 480, 1e-3),
            "the default at width 128 (2 heads; own teacher, 300 steps), AR -> k4 for 480 "
            "steps: about the default's distillation wall time"),
    Variant("default_d128_unigram_k4_480", "default_d128_unigram", "teacher,k4",
            _steps("k4", 480, 1e-3),
            "configs/kjv_tiny.py without its draft: width 128, unigram output bias at the "
            "teacher's start, AR -> k4 for 480 steps"),
    Variant("default_d128_unigram_k4_800", "default_d128_unigram", "teacher,k4",
            _steps("k4", 800, 1e-3),
            "the default's teacher, AR -> k4 for 800 steps (what the rest of the 25-minute "
            "budget would buy)"),
    Variant("default_d128_unigram_k4_480_lr2e-3", "default_d128_unigram", "teacher,k4",
            _steps("k4", 480, 2e-3),
            "the default's teacher, AR -> k4 for 480 steps at twice the default's peak lr"),
    Variant("default_d128_unigram_k4_240_b16", "default_d128_unigram", "teacher,k4",
            _steps("k4", 240, 1e-3, batch=16),
            "the default's teacher, AR -> k4 for 240 steps of 16 sequences (the default's "
            "sequences in half the steps)"),
    Variant("default_d128_unigram_k4_2400_lr2e-3", "default_d128_unigram", "teacher,k4",
            _steps("k4", 2400, 2e-3),
            "configs/kjv_small.py without its draft: the default's teacher, AR -> k4 for 2400 "
            "steps at lr 2e-3 (~53 min)"),
    Variant("default_d128_unigram_k4_5600_lr2e-3", "default_d128_unigram", "teacher,k4",
            _steps("k4", 5600, 2e-3) + (("stage_overrides.k4.train.eval_every", 400),),
            "the default's teacher, AR -> k4 for 5600 steps at lr 2e-3 (~2.5 h): the longest "
            "budget measured"),
    Variant("default_d128_unigram_k4_480_lr2e-3_ema", "default_d128_unigram", "teacher,k4",
            _steps("k4", 480, 2e-3) + (("stage_overrides.k4.optim.ema_decay", 0.999),),
            "as default_d128_unigram_k4_480_lr2e-3, evaluated on an EMA of the student's "
            "weights (decay 0.999 with the (1 + t) / (10 + t) warm-up)"),
    Variant("default_d128_unigram_k4_480_lr2e-3_f10000", "default_d128_unigram", "teacher,k4",
            _steps("k4", 480, 2e-3) + (("model.noise_max_freq", 10000.0),),
            "as default_d128_unigram_k4_480_lr2e-3 with noise features up to 10000 cycles "
            "over [0, 1] (the default: 1000)"),
    Variant("default_d128_unigram_k4_2400_lr2e-3_ema", "default_d128_unigram", "teacher,k4",
            _steps("k4", 2400, 2e-3) + (("stage_overrides.k4.optim.ema_decay", 0.999),),
            "as default_d128_unigram_k4_2400_lr2e-3 (configs/kjv_small.py), evaluated on an "
            "EMA of the student's weights (decay 0.999 with warm-up)"),
    Variant("default_d128_unigram_k4_480_lr2e-3_l8", "default_d128_unigram", "teacher,k4",
            _steps("k4", 480, 2e-3) + (("model.pflm_n_layers", 8),),
            "as default_d128_unigram_k4_480_lr2e-3 with a student of 8 blocks (the teacher's "
            "4, then 4 appended as identities: model.pflm_n_layers)"),
    Variant("default_d128_unigram_k4_480_lr4e-3", "default_d128_unigram", "teacher,k4",
            _steps("k4", 480, 4e-3),
            "the default's teacher, AR -> k4 for 480 steps at 4x the default's peak lr"),
    Variant("default_d128_unigram_k4_480_lr2e-3_ow1", "default_d128_unigram", "teacher,k4",
            _steps("k4", 480, 2e-3) + (("distill.offset_weight_growth", 1.0),),
            "as default_d128_unigram_k4_480_lr2e-3 with offset j's loss weighted 1 + (j - 1) "
            "(0.4 / 0.8 / 1.2 / 1.6: distill.offset_weight_growth=1)"),
    Variant("default_d128_unigram_k4_480_soft_muon_lr2e-3", "default_d128_unigram",
            "teacher,k4", _steps("k4", 480, 2e-3) + _SOFT_MUON,
            "the default's teacher, AR -> k4 for 480 steps on soft targets with Muon at lr 2e-3"),
    Variant("default_d128_unigram_k4_480_soft_muon_lr4e-3", "default_d128_unigram",
            "teacher,k4", _steps("k4", 480, 4e-3) + _SOFT_MUON,
            "configs/kjv_tiny.py's k4 stage from 2026-12-06 until its batch was halved: 480 "
            "steps on soft targets with Muon at lr 4e-3"),
    Variant("default_d128_unigram_k4_960_b4_soft_muon_lr4e-3", "default_d128_unigram",
            "teacher,k4", _steps("k4", 960, 4e-3, batch=4) + _SOFT_MUON + (
                ("stage_overrides.k4.train.eval_batches", 8),
                ("stage_overrides.k4.train.eval_every", 100)),
            "configs/kjv_tiny.py's k4 stage: 960 steps of 4 sequences on soft targets with Muon "
            "at lr 4e-3 (validated on 8 batches of 4: the same 32 rows)"),
    Variant("default_d128_unigram_k4_2400_soft_muon_lr4e-3", "default_d128_unigram",
            "teacher,k4", _steps("k4", 2400, 4e-3) + _SOFT_MUON,
            "configs/kjv_small.py's k4 stage on 2026-12-06 before its 4800-step schedule: 2400 "
            "steps on soft targets with Muon at lr 4e-3"),
    Variant("default_d128_unigram_k4_4800_b4_soft_muon_lr4e-3", "default_d128_unigram",
            "teacher,k4", _steps("k4", 4800, 4e-3, batch=4) + _SOFT_MUON + (
                ("stage_overrides.k4.train.eval_batches", 8),
                ("stage_overrides.k4.train.eval_every", 400)),
            "configs/kjv_small.py's k4 stage at kjv_tiny.py's half batch: 4800 steps of 4 "
            "sequences on soft targets with Muon at lr 4e-3 (no better than 2400 x 8)"),
    Variant("default_d128_unigram_h4_k4_960_b4_soft_muon_lr4e-3", "default_d128_unigram_h4",
            "teacher,k4", _steps("k4", 960, 4e-3, batch=4) + _SOFT_MUON + (
                ("stage_overrides.k4.train.eval_batches", 8),
                ("stage_overrides.k4.train.eval_every", 100)),
            "configs/kjv_tiny.py since 2026-12-06: 4 heads of 32, k4 960 steps of 4 sequences on "
            "soft targets with Muon at lr 4e-3"),
    Variant("default_d128_unigram_h4_sim_k4_960_b4_soft_muon_lr4e-3",
            "default_d128_unigram_h4_sim", "teacher,k4",
            _steps("k4", 960, 4e-3, batch=4) + _SOFT_MUON + (
                ("stage_overrides.k4.train.eval_batches", 8),
                ("stage_overrides.k4.train.eval_every", 100)),
            "configs/kjv_tiny.py with ids by similarity (data.bpe_id_order): k4 960 steps of 4 "
            "sequences on soft targets with Muon at lr 4e-3"),
    Variant("single_k4_120_f100", "v1024", "teacher,k4",
            _steps("k4", 120, 1e-3) + (("model.noise_max_freq", 100.0),),
            "AR -> k4, 120 steps, noise features up to 100 cycles over [0, 1]"),
]


def _apply(config, pairs) -> None:
  for field, value in pairs:
    *path, last = field.split(".")
    node = config
    for part in path:
      if part not in node:
        node[part] = {}
      node = node[part]
    node[last] = value


def _config(base_path: str, pairs, out_dir: str):
  from kforcing_jax.config import base as config_base

  config = config_base.load_config_file(base_path)
  _apply(config, STUDY_BASE + tuple(pairs))
  config.data.tfds_data_dir = os.path.join(out_dir, "tfds_data")  # one prepared copy for all
  return config


def train_teacher(out_dir: str, name: str) -> str:
  from kforcing_jax.training import trainer

  workdir = os.path.join(out_dir, "teachers", name)
  config = _config(_CONFIG.value, TEACHERS[name] + (("stages", "teacher"),), out_dir)
  trainer.run(config, workdir)
  return workdir


def train_variant(out_dir: str, v: Variant, teacher_dir: str) -> str:
  from kforcing_jax.training import trainer

  workdir = os.path.join(out_dir, "variants", v.name)
  if not os.path.exists(os.path.join(workdir, "checkpoints", "teacher")):
    os.makedirs(os.path.join(workdir, "checkpoints"), exist_ok=True)
    shutil.copytree(os.path.join(teacher_dir, "checkpoints", "teacher"),
                    os.path.join(workdir, "checkpoints", "teacher"))
    for f in ("tokenizer.json", "tokenizer_meta.json"):
      shutil.copy(os.path.join(teacher_dir, f), os.path.join(workdir, f))
    # The teacher's rows only: a teacher dir merged from a full run also logs its later stages.
    with open(os.path.join(teacher_dir, "metrics.jsonl")) as src, \
         open(os.path.join(workdir, "metrics.jsonl"), "w") as dst:
      dst.writelines(line for line in src if json.loads(line).get("stage") == "teacher")
  config = _config(_CONFIG.value, TEACHERS[v.teacher] + (("stages", v.stages),) + v.overrides,
                   out_dir)
  trainer.run(config, workdir)
  return workdir


def curve(workdir: str, stages: list[str]) -> tuple[list[dict], dict]:
  """Validation points of the final stage vs steps and cumulative distillation wall time;
  and the wall time of each stage (its last logged elapsed_s)."""
  from kforcing_jax.observe import metrics_log

  rows = metrics_log.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  wall = {}
  for r in rows:
    if "elapsed_s" in r:
      wall[r["stage"]] = max(wall.get(r["stage"], 0.0), r["elapsed_s"])
  before = sum(wall.get(s, 0.0) for s in stages[1:-1])
  points = []
  for r in rows:
    if r.get("stage") == stages[-1] and "val_ar_loss" in r:
      points.append({"step": r["step"], "distill_wall_s": before + r.get("elapsed_s", 0.0),
                     **{k[len("val_ar_"):]: v for k, v in r.items() if k.startswith("val_ar_")},
                     "teacher_data_nll": r.get("val_teacher_data_nll")})
  return points, wall


def evaluate(workdir: str, final_stage: str) -> list[dict]:
  import numpy as np

  from kforcing_jax.serving import quality
  from kforcing_jax.training import stage_io

  teacher = stage_io.load_stage(workdir, "teacher")
  student = stage_io.load_stage(workdir, final_stage, load_tokenizer=False)
  val = quality.held_out(teacher, workdir, max(_NUM_PROMPTS.value, _VAL_SEQS.value))
  eos = teacher.tokenizer.eos_id
  prompts = [[eos] + r[:31].tolist() for r in val[:_NUM_PROMPTS.value]]
  rows, _ = quality.evaluate(teacher, [student], prompts, np.asarray(val[:_VAL_SEQS.value]),
                             _MAX_NEW.value, 32, 0, windows=[student.k])
  return rows


def summary_row(name: str, rows: list[dict]) -> dict:
  t = next(r for r in rows if r["method"] == "ar")
  s = next(r for r in rows if r["method"] != "ar")
  k = s["k"]
  out = {"variant": name, "k": k, "teacher_data_nll": t["data_nll"],
         "teacher_gen_ppl": t["gen_ppl"], "teacher_entropy": t["entropy"],
         "gen_ppl": s["gen_ppl"], "gen_ppl_ratio": s["gen_ppl"] / t["gen_ppl"],
         "entropy": s["entropy"], "entropy_ratio": s["entropy"] / t["entropy"],
         "rep_2": s["rep_2"], "teacher_rep_2": t["rep_2"], "agree": s["agree"],
         **{f"nll_{j}": s[f"nll_{j}"] for j in range(1, k + 1)},
         **{f"acc_{j}": s[f"acc_{j}"] for j in range(1, k + 1)},
         # NLL_j - data NLL paired by row, with its standard error (absent from older runs).
         **{f"{name}_{j}": s[f"{name}_{j}"] for name in ("gap", "gap_se")
            for j in range(1, k + 1) if f"{name}_{j}" in s},
         # The teacher's reference points (quality.offset_floors; absent from older runs).
         **{f"{name}_{j}": t[f"{name}_{j}"] for name in ("blind", "prefix")
            for j in range(1, k + 1) if f"{name}_{j}" in t}}
  out["targets_met"] = bool(
      all(s[f"nll_{j}"] < t["data_nll"] for j in range(1, k + 1))
      and 0.77 <= out["gen_ppl_ratio"] <= 1.3 and abs(out["entropy_ratio"] - 1) <= 0.1)
  return out


def table(results: list[dict]) -> str:
  head = ("| variant | distill wall | k | NLL_j vs AR targets (teacher data NLL) | acc_j | agree | "
          "Gen-PPL (teacher) | entropy (teacher) | rep_2 (teacher) | targets | z-blind NLL_j |")
  lines = [head, "|" + "---|" * 11]
  for r in results:
    s, k = r["summary"], r["summary"]["k"]
    nll = " / ".join(f"{s[f'nll_{j}']:.2f}" for j in range(1, k + 1))
    acc = " / ".join(f"{s[f'acc_{j}']:.2f}" for j in range(1, k + 1))
    lines.append(
        f"| {r['name']} | {r['distill_wall_s'] / 60:.1f} min | {k} | {nll} ({s['teacher_data_nll']:.2f})"
        f" | {acc} | {s['agree']:.3f} | {s['gen_ppl']:.1f} ({s['teacher_gen_ppl']:.1f}) | "
        f"{s['entropy']:.2f} ({s['teacher_entropy']:.2f}) | {s['rep_2']:.3f} "
        f"({s['teacher_rep_2']:.3f}) | {'met' if s['targets_met'] else 'not met'} | "
        + (" / ".join(f"{s[f'blind_{j}']:.2f}" for j in range(1, k + 1)) if "blind_1" in s
           else "-") + " |")
  return "\n".join(lines)


def plot(results: list[dict], png: str) -> None:
  """Two panels of NLL_j minus the variant's own teacher data NLL (variants with different
  teachers compare; below 0 = the paper's Table-2 criterion met)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5.2))
  colors = plt.get_cmap("tab20").colors  # more variants than the default 10-colour cycle
  for i, r in enumerate(results):
    color, marker = colors[i % len(colors)], "osD^v<>"[i % 7]
    k, ref = r["summary"]["k"], r["summary"]["teacher_data_nll"]
    pts = r["curve"]
    if pts:
      mean = [sum(p[f"nll_{j}"] for j in range(1, k + 1)) / k - ref for p in pts]
      worst = [max(p[f"nll_{j}"] for j in range(1, k + 1)) - ref for p in pts]
      xs = [p["distill_wall_s"] / 60 for p in pts]
      a1.plot(xs, mean, "-", marker=marker, ms=3, color=color, label=r["name"])
      a1.plot(xs, worst, ":", color=color, lw=1)
    a2.plot(range(1, k + 1), [r["summary"][f"nll_{j}"] - ref for j in range(1, k + 1)], "-",
            marker=marker, color=color, label=r["name"])
  for ax in (a1, a2):
    ax.axhline(0.0, color="k", ls="--", lw=1, label="teacher data NLL")
    ax.grid(alpha=0.3)
    ax.set_ylabel("NLL vs AR-teacher targets - teacher data NLL (nats)")
  a1.set_xscale("log")  # budgets from ~2 to ~40 min: equal ratios, equal distances
  a1.set_xticks([1, 2, 5, 10, 20, 50], ["1", "2", "5", "10", "20", "50"])
  a1.minorticks_off()
  a1.set_xlabel("cumulative distillation wall time (min, 2-core CPU, log scale)")
  a1.set_title("final stage while it trains: mean over j (solid), worst j (dotted)")
  a2.set_xlabel("offset j")
  a2.set_xticks(range(1, max(r["summary"]["k"] for r in results) + 1))
  a2.set_title("after training (held-out evaluation)")
  a2.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(png, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  from kforcing_jax.config import check as config_check
  from kforcing_jax.observe import metrics_log

  metrics_log.configure_logging()
  log = metrics_log.log
  if _LIST.value:
    for v in VARIANTS:
      print(f"{v.name:<30} teacher={v.teacher:<11} stages={v.stages:<18} {v.note}")
    return
  if not _OUT.value:
    raise config_check.UserError("--out is required: the directory for work dirs and results")
  chosen = [x for x in _VARIANTS.value.split(",") if x] or [v.name for v in VARIANTS]
  unknown = sorted(set(chosen) - {v.name for v in VARIANTS})
  if unknown:
    raise config_check.ConfigError(f"--variants: unknown {unknown}; see --list")
  out = os.path.abspath(_OUT.value)
  os.makedirs(out, exist_ok=True)
  json_path = os.path.join(out, "fidelity.json")
  done = {}
  if os.path.exists(json_path):
    with open(json_path) as f:
      done = {r["name"]: r for r in json.load(f)["variants"]}
  results = []
  todo = [v for v in VARIANTS if v.name in chosen]
  note = metrics_log.Progress(len(todo), lambda m: log.info("[fidelity] %s", m)).step
  for i, v in enumerate(todo):
    teacher_dir = train_teacher(out, v.teacher)
    workdir = train_variant(out, v, teacher_dir)
    stages = config_check.parse_stages(v.stages)
    points, wall = curve(workdir, stages)
    prev = done.get(v.name)
    if prev and prev.get("wall_s") == wall:
      rows = prev["eval_rows"]
    else:
      rows = evaluate(workdir, stages[-1])
    results.append({"name": v.name, "note": v.note, "teacher": v.teacher, "stages": stages,
                    "overrides": [list(p) for p in v.overrides], "workdir": workdir,
                    "wall_s": wall, "distill_wall_s": sum(wall.get(s, 0.0) for s in stages[1:]),
                    "curve": points, "eval_rows": rows, "summary": summary_row(v.name, rows)})
    merged = {**done, **{r["name"]: r for r in results}}
    with open(json_path, "w") as f:
      json.dump({"settings": {"config": _CONFIG.value, "num_prompts": _NUM_PROMPTS.value,
                              "max_new_tokens": _MAX_NEW.value, "val_seqs": _VAL_SEQS.value},
                 "variants": list(merged.values())}, f, indent=1)
    note(f"{v.name} done")
  merged = list({**done, **{r["name"]: r for r in results}}.values())
  text = table(merged)
  print(text)
  with open(os.path.join(out, "fidelity.md"), "w") as f:
    f.write(text + "\n")
  plot(merged, os.path.join(out, "fidelity.png"))
  log.info("wrote %s, fidelity.md and fidelity.png", json_path)


if __name__ == "__main__":
  cli.run(main)
