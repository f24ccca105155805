"""Text statistics of the quality evaluation (pure numpy, no model)."""

import math

import pytest

from kforcing_jax.serving import quality


def test_entropy_by_offset_pools_each_block_offset_over_samples():
  # k=2: offset 1 sees tokens {1, 1, 1, 1} (entropy 0), offset 2 sees {2, 3, 4, 5} (log 4).
  samples = [[1, 2, 1, 3], [1, 4, 1, 5]]
  got = quality.entropy_by_offset(samples, 2)
  assert got == pytest.approx([0.0, math.log(4)])
  # k=1 is the pooled unigram entropy of everything: {1 x4, 2, 3, 4, 5}.
  p = [4 / 8] + [1 / 8] * 4
  assert quality.entropy_by_offset(samples, 1) == pytest.approx([-sum(x * math.log(x) for x in p)])
  # A ragged tail (3 tokens, k=2): offset 1 gets 2 tokens, offset 2 one.
  assert quality.entropy_by_offset([[7, 8, 9]], 2) == pytest.approx([math.log(2), 0.0])
