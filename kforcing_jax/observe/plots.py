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
  for (stage, key), (xs, ys) in sorted(series.items()):
    style = "-" if key == "loss" else "o-"
    ax.plot(xs, ys, style, label=f"{stage} {'train' if key == 'loss' else 'validation'}",
            markersize=3)
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_png, dpi=120)
  plt.close(fig)
