"""The training run's loss-curve PNG from metrics.jsonl (train and validation loss per stage)."""

import collections

from kforcing_jax.observe import metrics_log, report


def plot_loss_curves(metrics_path: str, out_png: str) -> None:
  rows = metrics_log.read_jsonl(metrics_path)
  series = collections.defaultdict(lambda: ([], []))
  for r in rows:
    for key in ("loss", "val_loss"):
      if key in r and "step" in r:
        xs, ys = series[(r.get("stage", "?"), key)]
        xs.append(r["step"])
        ys.append(r[key])
  start = phase_starts({stage: max(xs) for (stage, key), (xs, _) in series.items()
                        if key == "loss"})
  with report.figure(out_png) as (_, _, ax):
    for (stage, key), (xs, ys) in sorted(series.items()):
      style = "-" if key == "loss" else "o-"
      ax.plot([x + start.get(stage, 0) for x in xs], ys, style,
              label=f"{stage} {'train' if key == 'loss' else 'validation'}", markersize=3)
    report.finish_axes(ax, "step (a phase k<n>_<p> continues the count of k<n>)",
                       "cross-entropy (nats/token)", legend_size=None)
    ax.legend()


def phase_starts(last_step: dict[str, int]) -> dict[str, int]:
  """Step at which each phase stage "k<n>_<p>" starts on its stage's axis: the steps of k<n> and
  of its earlier phases, from {stage: its last logged step}."""
  from kforcing_jax.config import check

  out = {}
  for stage in last_step:
    base, phase = check.base_stage(stage), check.stage_phase(stage)
    if phase > 1:
      out[stage] = sum(last_step.get(check.phase_name(base, p), 0) for p in range(1, phase))
  return out
