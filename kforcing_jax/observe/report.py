"""Writing results: the one atomic file write, result JSON with provenance, text tables, plots.

Every tool that writes a result JSON (benchmark, evaluate, serve_load, train_cost, ...) writes it
through `write_result`, which adds a "provenance" entry: the command line, the git commit, the
machine and the UTC date that made it. Importing this module costs nothing: jax, matplotlib and
git are only reached when a function needs them. (metrics_log.py is the training run's own log;
plots.py draws its loss curves.)
"""

import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from typing import Any, Iterable, Sequence

# ---- files ----


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w"):
  """A file to write `path` through: it goes to a temporary file beside `path` that replaces
  it in one rename on success, so no reader (another process included) ever sees a half-written
  file; on an error the temporary file is removed and `path` is left as it was."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      yield f
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  with atomic_open(path) as f:
    f.write(text)


def write_json(path: str, obj: Any, **dump_kwargs) -> None:
  with atomic_open(path) as f:
    json.dump(obj, f, **dump_kwargs)


# ---- provenance ----


def git_commit(directory: str | None = None) -> str:
  """The commit checked out where this package lives ('+dirty' when it has local changes), or
  'unknown' outside a git checkout."""
  directory = directory or os.path.dirname(os.path.abspath(__file__))
  try:
    run = lambda *args: subprocess.run(["git", *args], cwd=directory, capture_output=True,
                                       text=True, timeout=10, check=True).stdout.strip()
    commit = run("rev-parse", "HEAD")
    dirty = run("status", "--porcelain", "--untracked-files=no")
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return commit + ("+dirty" if dirty else "")


def machine() -> dict:
  """The host and its accelerators."""
  import jax
  devices = jax.devices()
  return {"platform": platform.platform(), "python": platform.python_version(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "devices": {"platform": devices[0].platform, "kind": devices[0].device_kind,
                      "count": len(devices), "process_count": jax.process_count()}}


def provenance() -> dict:
  """What made a result: command line, commit, machine and UTC date."""
  return {"command": shlex.join(sys.argv), "cwd": os.getcwd(), "commit": git_commit(),
          "machine": machine(),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_result(path: str, result: dict, indent: int = 1) -> dict:
  """Write a tool's result JSON atomically, its "provenance" first; returns what was written."""
  out = {"provenance": provenance(), **result}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  write_json(path, out, indent=indent)
  return out


# ---- text tables ----

_LAYOUT = re.compile(r"^(?P<align>[<>^=]?)(?P<width>\d*)")


def text_row(columns: Sequence[tuple[str, str]], values: Iterable, sep: str = "") -> str:
  """One line of a fixed-width table: value i in columns[i]'s format spec (e.g. '>11.0f'); a
  string value (a label, '-', a pre-formatted cell) takes only the spec's alignment and width."""
  cells = []
  for (_, spec), v in zip(columns, values):
    if isinstance(v, str):
      m = _LAYOUT.match(spec)
      spec = (m["align"] or "<") + m["width"] if m["width"] else ""
    cells.append(f"{v:{spec}}")
  return sep.join(cells)


def text_table(columns: Sequence[tuple[str, str]], rows: Iterable[Sequence], sep: str = "",
               rule: str = "-") -> str:
  """A fixed-width text table: `columns` are (header, format spec) pairs; a header, a rule of
  `rule` under it, then one `text_row` per row of values."""
  head = text_row(columns, [h for h, _ in columns], sep)
  return "\n".join([head, rule * len(head)] + [text_row(columns, r, sep) for r in rows])


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
  """A Markdown table of pre-formatted cells (for docs that paste it as is)."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# ---- plots ----


@contextlib.contextmanager
def figure(out_png: str, ncols: int = 1, figsize: tuple[float, float] = (7, 4.5),
           suptitle: str = "", suptitle_size: float | None = None):
  """A headless (Agg) matplotlib figure of `ncols` axes, yielded as (plt, fig, axes), then laid
  out, saved to `out_png` at 120 dpi and closed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, ncols, figsize=figsize)
  try:
    yield plt, fig, axes
    if suptitle:
      fig.suptitle(suptitle, **({} if suptitle_size is None else {"fontsize": suptitle_size}))
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
  finally:
    plt.close(fig)


def by(rows: Iterable[dict], x: str, **match) -> list[dict]:
  """The rows whose fields equal `match`, sorted by field `x` (one plotted series)."""
  return sorted((r for r in rows if all(r.get(k) == v for k, v in match.items())),
                key=lambda r: r[x])


def finish_axes(ax, xlabel: str, ylabel: str, title: str = "", log2_x: bool = False,
                legend_size: float | None = 8, title_size: float | None = None) -> None:
  """Labels, an optional base-2 log x axis, a light grid and the legend."""
  if log2_x:
    ax.set_xscale("log", base=2)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title, **({} if title_size is None else {"fontsize": title_size}))
  ax.grid(alpha=0.3)
  if legend_size is not None:
    ax.legend(fontsize=legend_size)
