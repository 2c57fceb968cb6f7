"""benchmarks/synthetic_oracle.py's code-index oracle: the index it builds serves exactly the
generator's probabilities summed over a user's tokens (a slow reference on a random small taste
table), and keeps exactly the (code, item) pairs the generator gives a non-zero probability."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from tests.helpers import load_benchmark



@pytest.fixture(scope="module")
def oracle():
    return load_benchmark("synthetic_oracle")


def test_code_index_serves_the_generator_probabilities(oracle):
    rng = np.random.default_rng(0)
    segments, clusters, styles, items, p = 3, 5, 4, 60, 0.8
    taste = (rng.random((segments, clusters, styles)) < 0.4).astype(np.float64)
    cluster, style = rng.integers(0, clusters, items), rng.integers(0, styles, items)
    bucket_share, overall = rng.random(items), rng.random(items) / items
    index = oracle.code_index(segments, taste, cluster, style, bucket_share, overall, p)

    liked = taste[:, cluster, style]  # [G, N]: does segment g like item i's style in its cluster?
    nonzero = sum(int((liked[g] > 0)[cluster == c].sum()) for g in range(segments) for c in range(clusters))
    assert index.num_codes == segments * clusters and index.nnz == nonzero

    segment = rng.integers(0, segments, 4)
    histories = [rng.integers(0, clusters, n) for n in (5, 1, 3, 6)]
    repeated = np.ones((4, clusters))
    repeated[0, histories[0][0]] = 0  # that cluster's history items give no token
    codes = oracle.history_codes(segment, histories, repeated)
    assert codes.shape == (4, 6, 2) and (codes[1, 1:] == -1).all()

    per_style = taste / np.maximum(taste.sum(-1, keepdims=True), 1)
    expected = np.tile((1 - p) * overall, (4, 1))
    for u, history in enumerate(histories):
        for c in history[repeated[u, history] > 0]:
            expected[u] += p * (cluster == c) * per_style[segment[u], c, style] * bucket_share
    served = index.dense_scores(codes).numpy()
    np.testing.assert_allclose(served, expected, rtol=2e-3, atol=1e-6)  # float16 posting scores
    assert torch.equal(index.search(codes, 5)[1], torch.from_numpy(np.argsort(-served, 1, kind="stable")[:, :5]))
