"""Text statistics of the quality evaluation (pure numpy, no model)."""

import math

import pytest

from kforcing_jax.serving import quality, quality_metrics


def test_entropy_by_offset_pools_each_block_offset_over_samples():
  # k=2: offset 1 sees tokens {1, 1, 1, 1} (entropy 0), offset 2 sees {2, 3, 4, 5} (log 4).
  samples = [[1, 2, 1, 3], [1, 4, 1, 5]]
  got = quality_metrics.entropy_by_offset(samples, 2)
  assert got == pytest.approx([0.0, math.log(4)])
  # k=1 is the pooled unigram entropy of everything: {1 x4, 2, 3, 4, 5}.
  p = [4 / 8] + [1 / 8] * 4
  assert quality_metrics.entropy_by_offset(samples, 1) == pytest.approx(
      [-sum(x * math.log(x) for x in p)])
  # A ragged tail (3 tokens, k=2): offset 1 gets 2 tokens, offset 2 one.
  assert quality_metrics.entropy_by_offset([[7, 8, 9]], 2) == pytest.approx([math.log(2), 0.0])


def test_gaps_to_data_nll_pair_rows_so_text_difficulty_cancels():
  import numpy as np

  rng = np.random.default_rng(0)
  difficulty = rng.uniform(2.0, 6.0, 64)  # rows differ by nats in how hard their text is
  noise = 0.01 * rng.standard_normal((64, 2))
  row_nll = difficulty[:, None] + np.array([-0.5, 0.1]) + noise
  got = quality_metrics.gaps_to_data_nll(row_nll, difficulty)
  assert got["gap_1"] == pytest.approx(-0.5, abs=0.01)
  assert got["gap_2"] == pytest.approx(0.1, abs=0.01)
  # The standard error is the noise's (0.01 / 8), not the difficulty's spread (~1.2 / 8).
  for j in (1, 2):
    assert got[f"gap_se_{j}"] == pytest.approx(np.std(noise[:, j - 1], ddof=1) / 8, rel=1e-6)
    assert got[f"gap_se_{j}"] < 0.01
  # One row: no spread to estimate.
  assert math.isnan(quality_metrics.gaps_to_data_nll(row_nll[:1], difficulty[:1])["gap_se_1"])


def test_miss_anatomy_buckets_by_bin_width_chains_hits_and_compares_entropies():
  import numpy as np

  # 4 windows of k=2. Offset 1: hits in windows 0 and 2; offset 2: hits in windows 0 and 1.
  pred = np.array([[5, 7], [9, 9], [6, 1], [5, 2]])
  target = np.array([[5, 7], [8, 9], [6, 3], [4, 3]])
  q = np.array([[0.5, 0.005], [0.05, 0.2], [0.001, 0.05], [0.2, 0.02]])
  got = quality_metrics.miss_anatomy(pred, target, q)
  # Offset 1: targets with q < .01: window 2 (hit); .01-.1: window 1 (miss); >= .1: 0 (hit), 3 (miss).
  assert got["q_share_1"] == pytest.approx([0.25, 0.25, 0.5])
  assert got["acc_q_1"] == pytest.approx([1.0, 0.0, 0.5])
  # Offset 2: q < .01: window 0 (hit); .01-.1: windows 2, 3 (misses); >= .1: window 1 (hit).
  assert got["q_share_2"] == pytest.approx([0.25, 0.5, 0.25])
  assert got["acc_q_2"] == pytest.approx([1.0, 0.0, 1.0])
  # After a hit at offset 1 (windows 0, 2), offset 2 hits once of twice.
  assert got["acc_after_hits_2"] == pytest.approx(0.5) and "acc_after_hits_1" not in got
  # Entropies of the argmax ids {5, 9, 6, 5} and the targets {5, 8, 6, 4} at offset 1.
  h = lambda ps: -sum(p * math.log(p) for p in ps)
  assert got["argmax_entropy_1"] == pytest.approx(h([0.5, 0.25, 0.25]))
  assert got["target_entropy_1"] == pytest.approx(math.log(4))
  assert got["target_entropy_2"] == pytest.approx(h([0.25, 0.25, 0.5]))
  # An empty bucket has no accuracy; no window with all earlier offsets hit has none either.
  none = quality_metrics.miss_anatomy(np.array([[1, 1]]), np.array([[2, 1]]),
                                      np.array([[0.5, 0.5]]))
  assert none["acc_q_1"] == [None, None, 0.0] and none["acc_after_hits_2"] is None
  assert "where each stage's full window misses" in quality.miss_table(
      [{"method": "pflm", "stage": "k2", "k": 2, "acc_1": 0.5, "acc_2": 0.5, **got}])
  assert "nll_q_1" not in got  # without the student's NLL, no NLL split
  # With it: NLL_j and the teacher's -log q per bucket, and NLL_2 after a hit at offset 1.
  nll = np.array([[0.1, 6.0], [2.0, 1.0], [3.0, 4.0], [1.5, 2.5]])
  with_nll = quality_metrics.miss_anatomy(pred, target, q, nll)
  assert with_nll["nll_q_1"] == pytest.approx([3.0, 2.0, 0.8])
  assert with_nll["surprisal_q_1"] == pytest.approx(
      [-math.log(0.001), -math.log(0.05), -(math.log(0.5) + math.log(0.2)) / 2])
  assert with_nll["nll_q_2"] == pytest.approx([6.0, 3.25, 1.0])
  assert with_nll["nll_after_hits_2"] == pytest.approx(5.0)  # windows 0 and 2
  table = quality.miss_table(
      [{"method": "pflm", "stage": "k2", "k": 2, "acc_1": 0.5, "acc_2": 0.5, **with_nll}])
  assert "-log q(y_j)" in table and "  0.80 / 1.15" in table


def test_frontier_compares_gen_ppl_at_equal_entropy():
  """ppl@H: the student's Gen-PPL over the teacher's at the student's entropy, the teacher's
  log Gen-PPL linear in entropy between its temperatures; None outside the teacher's range."""
  from kforcing_jax.serving import quality
  row = lambda stage, method, k, t, ppl, ent: {"stage": stage, "method": method, "k": k,
                                               "temperature": t, "gen_ppl": ppl,
                                               "entropy": ent, "rep_2": 0.1, "rep_4": 0.0}
  rows = [row("teacher", "ar", 1, 0.8, 10.0, 3.0), row("teacher", "ar", 1, 1.0, 40.0, 3.5),
          row("k4", "pflm", 1, 1.0, 99.0, 3.4), row("k4", "pflm", 4, 1.0, 40.0, 3.25),
          row("k4", "pflm", 4, 0.8, 12.0, 2.9), row("k4", "pflm_verified", 4, 1.0, 40.0, 3.5)]
  points = quality.frontier(rows)
  assert [(p["stage"], p["k"], p["temperature"]) for p in points] == [
      ("teacher", 1, 0.8), ("teacher", 1, 1.0), ("k4", 4, 0.8), ("k4", 4, 1.0)]
  assert points[3]["ppl_at_entropy"] == pytest.approx(2.0)  # 40 / sqrt(10 * 40)
  assert points[2]["ppl_at_entropy"] is None and points[0]["ppl_at_entropy"] is None
  assert "ppl@H" in quality.frontier_table(points)
