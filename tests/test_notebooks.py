"""The Colab notebooks execute headlessly (nbclient + ipykernel) on a shrunken config.

The quickstart trains a 1-layer d=64 teacher and distils it straight to k=4 for a few steps,
decodes and benchmarks; the streaming notebook then loads that work dir's k4 stage. Settings go
in through KF_NOTEBOOK_SETTINGS, which each notebook's settings cell reads.
"""

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

# Slow tier (-m 'not slow' skips it): executes the Colab notebooks end to end.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_notebook(name: str, settings: dict, monkeypatch) -> nbformat.NotebookNode:
  monkeypatch.setenv("KF_NOTEBOOK_SETTINGS", json.dumps(settings))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")  # One CPU device in the kernel: fewer, faster compiles.
  nb = nbformat.read(os.path.join(REPO, "colabs", f"{name}.ipynb"), as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs, f"{name}.ipynb is committed with outputs; clear them"
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": os.path.join(REPO, "colabs")}}).execute()
  return nb


def text_of(nb) -> str:
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      out.append(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")))
  return "\n".join(out)


def images_of(nb) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_quickstart_then_streaming_notebook(tmp_path, monkeypatch):
  workdir = str(tmp_path / "quickstart")
  quick = run_notebook("quickstart", {
      "workdir": workdir, "stages": "teacher,k4",
      "overrides": {"model.d_model": 64, "model.n_layers": 1, "model.n_heads": 2,
                    "data.bpe_vocab_size": 512, "data.tfds_data_dir": str(tmp_path / "tfds"),
                    "seq_len": 32, "batch_size": 8, "optim.warmup_steps": 1,
                    "stage_overrides.teacher.train.num_steps": 6,
                    "stage_overrides.k4.train.num_steps": 2,
                    "stage_overrides.k4.optim.warmup_steps": 1, "train.log_every": 2,
                    "train.eval_every": 100, "train.eval_batches": 1, "train.ckpt_every": 100},
      "prompts": ["In the beginning"], "max_new_tokens": 8, "bench_batch_sizes": [2],
      "bench_k": [4], "bench_reps": 1, "bench_stepwise": False}, monkeypatch)
  text = text_of(quick)
  assert "[teacher] step 6/6" in text and "[k4] step 2/2" in text
  assert "=== teacher (AR, 1 token(s) per pass)" in text and "=== k4 (PFLM, 4 token(s)" in text
  assert "'In the beginning" in text
  assert "method" in text and "speedup" in text and "pflm" in text  # the benchmark table
  assert images_of(quick) == 2  # loss curve and speedup plot
  for name in ("loss_curve.png", "decode_speedup.png", "checkpoints/k4/model_config.json"):
    assert os.path.exists(os.path.join(workdir, name)), name

  streaming = run_notebook("generate_streaming", {
      "workdir": workdir, "stage": "", "max_new_tokens": 8, "prompt": "And God said,"},
      monkeypatch)
  text = text_of(streaming)
  assert "loaded k4 (step 2, trained k=4)" in text
  assert "And God said," in text and text.count("|") >= 2  # 8 tokens in blocks of 4
