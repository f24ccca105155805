"""Loss-curve PNG from metrics.jsonl (train and validation loss per stage)."""

import collections

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kforcing_jax.observe import metrics_log  # noqa: E402


def plot_loss_curves(metrics_path: str, out_png: str) -> None:
  rows = metrics_log.read_jsonl(metrics_path)
  series = collections.defaultdict(lambda: ([], []))
  for r in rows:
    for key in ("loss", "val_loss"):
      if key in r and "step" in r:
        xs, ys = series[(r.get("stage", "?"), key)]
        xs.append(r["step"])
        ys.append(r[key])
  fig, ax = plt.subplots(figsize=(7, 4.5))
  start = phase_starts({stage: max(xs) for (stage, key), (xs, _) in series.items()
                        if key == "loss"})
  for (stage, key), (xs, ys) in sorted(series.items()):
    style = "-" if key == "loss" else "o-"
    ax.plot([x + start.get(stage, 0) for x in xs], ys, style,
            label=f"{stage} {'train' if key == 'loss' else 'validation'}", markersize=3)
  ax.set_xlabel("step (a phase k<n>_<p> continues the count of k<n>)")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_png, dpi=120)
  plt.close(fig)


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
