"""Fidelity study machinery: how close do distilled students get to their AR teacher, per budget?

The study's variants live outside the library, in experiments/fidelity_study.py (a `Study`):
  python -m experiments.fidelity_study --out runs/fidelity [--variants single_k4,chain,...]

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
from kforcing_jax.observe import report

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
  teacher: str  # key of Study.teachers: the base-config fields the teacher is trained with
  stages: str
  overrides: tuple  # (dotted field, value) pairs applied after the teacher's
  note: str = ""


@dataclasses.dataclass(frozen=True)
class Study:
  """A registry of variants: `base` (dotted field, value) pairs applied to the base config
  before anything else (so that a variant means the same when the default config changes), the
  teachers by name, and the variants in the order a run of the study trains them."""
  base: tuple
  teachers: dict
  variants: list


def stage_budget(stage: str, n: int, lr: float | None = None, warmup: int | None = None,
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


def _apply(config, pairs) -> None:
  for field, value in pairs:
    *path, last = field.split(".")
    node = config
    for part in path:
      if part not in node:
        node[part] = {}
      node = node[part]
    node[last] = value


def build_config(base_path: str, study: Study, pairs, out_dir: str):
  """The config of a teacher or variant: the base config file, the study's base, then pairs."""
  from kforcing_jax.config import base as config_base

  config = config_base.load_config_file(base_path)
  _apply(config, study.base + tuple(pairs))
  config.data.tfds_data_dir = os.path.join(out_dir, "tfds_data")  # one prepared copy for all
  return config


def variant_config(base_path: str, study: Study, v: Variant, out_dir: str):
  return build_config(base_path, study,
                      study.teachers[v.teacher] + (("stages", v.stages),) + v.overrides, out_dir)


def train_teacher(out_dir: str, study: Study, name: str) -> str:
  from kforcing_jax.training import trainer

  workdir = os.path.join(out_dir, "teachers", name)
  config = build_config(_CONFIG.value, study, study.teachers[name] + (("stages", "teacher"),),
                        out_dir)
  trainer.run(config, workdir)
  return workdir


def train_variant(out_dir: str, study: Study, v: Variant, teacher_dir: str) -> str:
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
  trainer.run(variant_config(_CONFIG.value, study, v, out_dir), workdir)
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
  header = ["variant", "distill wall", "k", "NLL_j vs AR targets (teacher data NLL)", "acc_j",
            "agree", "Gen-PPL (teacher)", "entropy (teacher)", "rep_2 (teacher)", "targets",
            "z-blind NLL_j"]
  rows = []
  for r in results:
    s, k = r["summary"], r["summary"]["k"]
    per_j = lambda name: " / ".join(f"{s[f'{name}_{j}']:.2f}" for j in range(1, k + 1))
    rows.append([r["name"], f"{r['distill_wall_s'] / 60:.1f} min", str(k),
                 f"{per_j('nll')} ({s['teacher_data_nll']:.2f})", per_j("acc"),
                 f"{s['agree']:.3f}", f"{s['gen_ppl']:.1f} ({s['teacher_gen_ppl']:.1f})",
                 f"{s['entropy']:.2f} ({s['teacher_entropy']:.2f})",
                 f"{s['rep_2']:.3f} ({s['teacher_rep_2']:.3f})",
                 "met" if s["targets_met"] else "not met",
                 per_j("blind") if "blind_1" in s else "-"])
  return report.markdown_table(header, rows)


def plot(results: list[dict], png: str) -> None:
  """Two panels of NLL_j minus the variant's own teacher data NLL (variants with different
  teachers compare; below 0 = the paper's Table-2 criterion met)."""
  with report.figure(png, ncols=2, figsize=(13, 5.2)) as (plt, _, (a1, a2)):
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
    ylabel = "NLL vs AR-teacher targets - teacher data NLL (nats)"
    for ax in (a1, a2):
      ax.axhline(0.0, color="k", ls="--", lw=1, label="teacher data NLL")
    a1.set_xscale("log")  # budgets from ~2 to ~40 min: equal ratios, equal distances
    a1.set_xticks([1, 2, 5, 10, 20, 50], ["1", "2", "5", "10", "20", "50"])
    a1.minorticks_off()
    report.finish_axes(a1, "cumulative distillation wall time (min, 2-core CPU, log scale)",
                       ylabel, "final stage while it trains: mean over j (solid), worst j "
                       "(dotted)", legend_size=None)
    a2.set_xticks(range(1, max(r["summary"]["k"] for r in results) + 1))
    report.finish_axes(a2, "offset j", ylabel, "after training (held-out evaluation)",
                       legend_size=7)


def main(argv, study: Study):
  """The study's command line (flags above) over `study`'s variants."""
  del argv
  from kforcing_jax.config import check as config_check
  from kforcing_jax.observe import metrics_log

  metrics_log.configure_logging()
  log = metrics_log.log
  if _LIST.value:
    for v in study.variants:
      print(f"{v.name:<30} teacher={v.teacher:<11} stages={v.stages:<18} {v.note}")
    return
  if not _OUT.value:
    raise config_check.UserError("--out is required: the directory for work dirs and results")
  chosen = [x for x in _VARIANTS.value.split(",") if x] or [v.name for v in study.variants]
  unknown = sorted(set(chosen) - {v.name for v in study.variants})
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
  todo = [v for v in study.variants if v.name in chosen]
  note = metrics_log.Progress(len(todo), lambda m: log.info("[fidelity] %s", m)).step
  for i, v in enumerate(todo):
    teacher_dir = train_teacher(out, study, v.teacher)
    workdir = train_variant(out, study, v, teacher_dir)
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


def run_cli(study: Study) -> None:
  """Entry point of a study script: `fidelity.run_cli(STUDY)` under `if __name__ == ...`."""
  cli.run(lambda argv: main(argv, study))
