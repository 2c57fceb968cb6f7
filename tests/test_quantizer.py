"""ProductQuantizer and ResidualQuantizer: exact search, straight-through gradients, EMA learning, restarts, code ids."""

from __future__ import annotations

import math

import pytest
import torch

import crosstower.nn.quantizer as quantizer_module
from crosstower.nn.quantizer import ProductQuantizer, ResidualQuantizer

torch.set_num_threads(1)


def _brute_force_codes(pq: ProductQuantizer, x: torch.Tensor) -> torch.Tensor:
    """Nearest entry per sub-vector by explicit differences: ``[R, D]`` -> ``[R, M]``."""
    sub = x.reshape(x.shape[0], pq.num_codebooks, pq.sub_dim)
    diff = sub[:, :, None, :] - pq.codebooks[None]  # [R, M, N, d]
    return diff.pow(2).sum(-1).argmin(-1)


def _set_codebooks(pq: ProductQuantizer, books: torch.Tensor) -> None:
    """Put ``books [M, N, d]`` in place as if they had been learned (EMA state consistent)."""
    with torch.no_grad():
        pq.codebooks.copy_(books)
        pq.embed_sum_ema.copy_(books)
        pq.cluster_size_ema.fill_(1.0)
        pq.initialized.fill_(True)


def _clustered(centres: torch.Tensor, rows: int, spread: float = 0.05) -> torch.Tensor:
    """``rows`` vectors whose sub-vector m lies near a random centre of ``centres[m]`` (``[M, N, d]``)."""
    m, n, d = centres.shape
    pick = torch.randint(n, (rows, m))
    sub = centres[torch.arange(m), pick] + spread * torch.randn(rows, m, d)
    return sub.reshape(rows, m * d)


@pytest.mark.parametrize("m,n,d", [(1, 3, 4), (2, 16, 8), (4, 7, 12), (3, 64, 6)])
def test_codes_equal_brute_force_nearest(m, n, d):
    torch.manual_seed(0)
    pq = ProductQuantizer(d, num_codebooks=m, codebook_size=n).double().eval()
    _set_codebooks(pq, torch.randn(m, n, d // m, dtype=torch.float64))
    x = torch.randn(50, d, dtype=torch.float64)
    out = pq(x)
    assert out.codes.dtype == torch.int64 and out.codes.shape == (50, m)
    assert torch.equal(out.codes, _brute_force_codes(pq, x))


def test_search_is_exact_across_row_chunks(monkeypatch):
    torch.manual_seed(1)
    pq = ProductQuantizer(6, num_codebooks=2, codebook_size=5).double().eval()
    _set_codebooks(pq, torch.randn(2, 5, 3, dtype=torch.float64))
    x = torch.randn(4, 9, 6, dtype=torch.float64)
    whole = pq(x).codes
    monkeypatch.setattr(quantizer_module, "_SEARCH_BUDGET", 2 * 5 * 4)  # 4 rows per chunk
    assert torch.equal(pq(x).codes, whole)
    assert torch.equal(whole.reshape(-1, 2), _brute_force_codes(pq, x.reshape(-1, 6)))


def test_float32_codes_are_at_minimum_distance():
    torch.manual_seed(2)
    pq = ProductQuantizer(8, num_codebooks=2, codebook_size=32).eval()
    x = torch.randn(64, 8)
    codes = pq(x).codes
    sub = x.reshape(64, 2, 4)
    dist = (sub[:, :, None, :] - pq.codebooks[None]).pow(2).sum(-1)  # [R, M, N]
    chosen = dist.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(chosen, dist.min(-1).values, atol=1e-5)


def test_straight_through_gradient_is_identity_and_codebooks_are_not_parameters():
    torch.manual_seed(3)
    pq = ProductQuantizer(8, num_codebooks=2, codebook_size=4)
    x = torch.randn(3, 5, 8, requires_grad=True)
    books = pq.codebooks.clone()
    out = pq(x)  # training mode: lazy init, then an EMA step after the codes are chosen
    assert out.quantized.shape == x.shape
    assert not torch.equal(pq.codebooks, books)
    out.quantized.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert list(pq.parameters()) == []
    assert not pq.codebooks.requires_grad


def test_commitment_loss_reaches_x_only():
    torch.manual_seed(4)
    pq = ProductQuantizer(8, num_codebooks=2, codebook_size=4, commitment=0.25).eval()
    x = torch.randn(6, 8, requires_grad=True)
    out = pq(x)
    q = pq.lookup(out.codes)
    assert torch.allclose(out.loss, 0.25 * (x - q).pow(2).mean())
    out.loss.backward()
    assert torch.allclose(x.grad, 0.25 * 2 * (x - q).detach() / x.numel())
    assert x.grad.abs().sum() > 0
    assert not out.perplexity.requires_grad and not out.usage.requires_grad


def test_ema_codebooks_converge_to_cluster_centres():
    torch.manual_seed(5)
    centres = torch.tensor([[[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [3.0, 3.0]],
                            [[-2.0, 1.0], [2.0, 1.0], [0.0, -3.0], [5.0, 5.0]]])  # [M=2, N=4, d=2]
    pq = ProductQuantizer(4, num_codebooks=2, codebook_size=4, decay=0.8, data_init=False)
    start = centres + 0.6 * torch.randn_like(centres)
    pq.init_from(start.transpose(0, 1).reshape(4, 4))

    def gap() -> float:
        dist = (centres[:, :, None, :] - pq.codebooks[:, None, :, :]).norm(dim=-1)  # [M, centre, entry]
        return dist.min(-1).values.max().item()

    before = gap()
    pq.train()
    for _ in range(60):
        pq(_clustered(centres, rows=256))
    after = gap()
    assert after < 0.05 < before
    assert pq.stats()["usage"] == 1.0
    assert math.isclose(pq.stats()["perplexity"], 4.0, rel_tol=0.1)


def test_lazy_init_puts_codebooks_in_the_data_region():
    torch.manual_seed(6)
    pq = ProductQuantizer(4, num_codebooks=2, codebook_size=8)
    assert not bool(pq.initialized)
    x = 10.0 + torch.rand(40, 4)
    pq(x)
    assert bool(pq.initialized)
    assert pq.codebooks.min() > 9.5 and pq.codebooks.max() < 11.5


def test_dead_code_is_restarted_into_the_data_region():
    torch.manual_seed(7)
    pq = ProductQuantizer(4, num_codebooks=2, codebook_size=4, decay=0.5, dead_threshold=1e-3, data_init=False)
    x0 = torch.rand(64, 4)
    pq.init_from(x0)
    with torch.no_grad():  # entry 2 of codebook 1 far from all data: it never wins
        pq.codebooks[1, 2] = 100.0
        pq.embed_sum_ema[1, 2] = 100.0
    pq.train()
    restarted = 0.0
    for _ in range(12):  # 0.5 ** 10 < 1e-3: dead after ~10 steps
        pq(torch.rand(64, 4))
        restarted += pq.stats()["restarted"]
    assert restarted >= 1
    entry = pq.codebooks[1, 2]
    assert entry.min() > -0.1 and entry.max() < 1.1
    assert pq.cluster_size_ema[1, 2] >= 1e-3


def test_restart_is_reproducible_under_manual_seed():
    def run() -> dict[str, torch.Tensor]:
        torch.manual_seed(8)
        pq = ProductQuantizer(4, num_codebooks=2, codebook_size=16, decay=0.5)
        for _ in range(15):
            pq(torch.rand(10, 4))  # 10 rows for 16 entries: some always die
        return pq.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_mode_changes_no_buffers():
    torch.manual_seed(9)
    pq = ProductQuantizer(4, num_codebooks=2, codebook_size=8, decay=0.5)
    pq(torch.randn(32, 4))  # initialise and take one step
    pq.eval()
    before = {k: v.clone() for k, v in pq.state_dict().items()}
    stats = pq.stats()
    for _ in range(3):
        pq(torch.randn(32, 4) * 5)
    after = pq.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert pq.stats() == stats
    fresh = ProductQuantizer(4, num_codebooks=2, codebook_size=8).eval()
    fresh(torch.randn(5, 4))
    assert not bool(fresh.initialized)


def test_perplexity_and_usage_on_a_hand_made_histogram():
    pq = ProductQuantizer(2, num_codebooks=1, codebook_size=4, data_init=False).eval()
    _set_codebooks(pq, torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]))
    x = torch.tensor([[0.1, 0.0], [0.0, -0.1], [0.9, 0.1], [0.1, 0.8]])  # codes 0, 0, 1, 2
    out = pq(x)
    assert out.codes.squeeze(-1).tolist() == [0, 0, 1, 2]
    p = torch.tensor([0.5, 0.25, 0.25])
    assert torch.allclose(out.perplexity, torch.exp(-(p * p.log()).sum()).reshape(1))
    assert torch.allclose(out.perplexity, torch.tensor([2**1.5]))
    assert torch.allclose(out.usage, torch.tensor([0.75]))


def test_code_ids_round_trip_and_lookup_matches_forward():
    torch.manual_seed(10)
    pq = ProductQuantizer(6, num_codebooks=3, codebook_size=5).eval()
    assert pq.num_codes == 125
    assert pq.code_ids(torch.tensor([1, 2, 3])).item() == 1 * 25 + 2 * 5 + 3
    ids = torch.arange(pq.num_codes)
    codes = pq.codes_from_ids(ids)
    assert codes.shape == (125, 3) and codes.dtype == torch.int64
    assert torch.equal(pq.code_ids(codes), ids)
    assert codes.unique(dim=0).shape[0] == 125
    assert codes[:6].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 0, 4], [0, 1, 0]]
    x = torch.randn(2, 7, 6)
    out = pq(x)
    assert torch.equal(pq.codes_from_ids(pq.code_ids(out.codes)), out.codes)
    assert pq.code_ids(out.codes).shape == (2, 7)
    assert torch.equal(pq.lookup(out.codes), out.quantized.detach())


def test_state_dict_round_trip_reproduces_outputs():
    torch.manual_seed(11)
    pq = ProductQuantizer(8, num_codebooks=2, codebook_size=8)
    for _ in range(3):
        pq(torch.randn(20, 8))
    torch.manual_seed(99)
    other = ProductQuantizer(8, num_codebooks=2, codebook_size=8)
    other.load_state_dict(pq.state_dict())
    pq.eval(), other.eval()
    x = torch.randn(30, 8)
    a, b = pq(x), other(x)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.quantized, b.quantized)
    assert bool(other.initialized)


def test_invalid_arguments_raise_value_error():
    with pytest.raises(ValueError, match="not divisible by num_codebooks"):
        ProductQuantizer(10, num_codebooks=3)
    with pytest.raises(ValueError, match="decay"):
        ProductQuantizer(8, decay=1.0)
    pq = ProductQuantizer(8, num_codebooks=2, codebook_size=4)
    with pytest.raises(ValueError, match="last dimension 8"):
        pq(torch.randn(3, 6))
    with pytest.raises(ValueError, match="last dimension 2"):
        pq.lookup(torch.zeros(3, 3, dtype=torch.int64))


def test_kmeans_init_puts_one_entry_on_each_cluster():
    """Tokens from 16 well-separated clusters per codebook: every k-means entry is in use and the
    reconstruction error is a small part of the tokens' spread (k-means may still merge two
    clusters and split another, so no exact recovery is asserted)."""
    torch.manual_seed(0)
    centres = torch.randn(2, 16, 4) * 3
    x = _clustered(centres, 4000, spread=0.01)
    pq = ProductQuantizer(8, num_codebooks=2, codebook_size=16)
    pq.init_kmeans(x, seed=0)
    assert bool(pq.initialized)
    out = pq.eval()(x)
    assert (out.usage == 1).all()
    assert (out.quantized - x).pow(2).sum(-1).mean() < 0.1 * (x - x.mean(0)).pow(2).sum(-1).mean()
    assert torch.allclose(pq.cluster_size_ema.mean(-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(pq.embed_sum_ema / pq.cluster_size_ema.unsqueeze(-1), pq.codebooks, atol=1e-5)


def test_kmeans_init_needs_as_many_vectors_as_entries():
    with pytest.raises(ValueError, match="at least 16 vectors"):
        ProductQuantizer(8, num_codebooks=2, codebook_size=16).init_kmeans(torch.randn(10, 8))


def test_window_stats_cover_every_batch_since_the_last_call():
    """Two batches that each use half the entries: the window sees all of them, the last batch half."""
    pq = ProductQuantizer(2, num_codebooks=1, codebook_size=4, decay=0.9, restart_dead=False)
    _set_codebooks(pq, torch.tensor([[[0.0, 0.0], [0.0, 10.0], [10.0, 0.0], [10.0, 10.0]]]))
    pq.train()
    pq(torch.tensor([[0.0, 0.0], [0.0, 10.0]]))
    pq(torch.tensor([[10.0, 0.0], [10.0, 10.0]]))
    assert pq.stats()["usage"] == 0.5
    window = pq.window_stats()
    assert window["usage"] == 1.0 and math.isclose(window["perplexity"], 4.0, rel_tol=1e-6)
    assert "usage" not in pq.window_stats()  # a new, empty window


# ---------------------------------------------------------------------------- residual quantiser
def _greedy_residual_codes(rq: ResidualQuantizer, x: torch.Tensor) -> torch.Tensor:
    """One row and one level at a time: the entry nearest to what the levels before left over."""
    codes = torch.zeros(x.shape[0], rq.num_codebooks, dtype=torch.int64)
    for r in range(x.shape[0]):
        residual = x[r].clone()
        for m in range(rq.num_codebooks):
            codes[r, m] = min(range(rq.codebook_size), key=lambda n: float((residual - rq.codebooks[m, n]).pow(2).sum()))
            residual = residual - rq.codebooks[m, codes[r, m]]
    return codes


@pytest.mark.parametrize("m,n,d", [(1, 3, 4), (2, 16, 8), (3, 7, 5)])
def test_residual_codes_equal_greedy_reference_and_reconstruct_as_sums(m, n, d):
    torch.manual_seed(0)
    rq = ResidualQuantizer(d, num_codebooks=m, codebook_size=n).double().eval()
    _set_codebooks(rq, torch.randn(m, n, d, dtype=torch.float64) / (1 + torch.arange(m, dtype=torch.float64)).view(m, 1, 1))
    x = torch.randn(40, d, dtype=torch.float64, requires_grad=True)
    out = rq(x)
    assert out.codes.shape == (40, m) and torch.equal(out.codes, _greedy_residual_codes(rq, x.detach()))
    summed = sum(rq.codebooks[level, out.codes[:, level]] for level in range(m))
    assert torch.allclose(out.quantized.detach(), summed) and torch.equal(rq.lookup(out.codes), out.quantized.detach())
    out.quantized.sum().backward()  # straight-through
    assert torch.equal(x.grad, torch.ones_like(x))
    assert torch.equal(rq.codes_from_ids(rq.code_ids(out.codes)), out.codes)


def test_residual_kmeans_init_recovers_a_coarse_plus_fine_code():
    """Tokens that are a coarse centre plus a fine offset (16 of each): k-means level by level
    puts the coarse centres in codebook 1 and the offsets in codebook 2, so the two-level code
    reconstructs the tokens far better than one level can, and uses every entry."""
    torch.manual_seed(0)
    coarse, fine = torch.randn(16, 8) * 4, torch.randn(16, 8) * 0.5
    x = coarse[torch.randint(16, (4000,))] + fine[torch.randint(16, (4000,))] + 0.01 * torch.randn(4000, 8)
    rq = ResidualQuantizer(8, num_codebooks=2, codebook_size=16)
    rq.init_kmeans(x, seed=0)
    out = rq.eval()(x)
    two_levels = (out.quantized - x).pow(2).sum(-1).mean()
    one_level = (rq.codebooks[0, out.codes[:, 0]] - x).pow(2).sum(-1).mean()
    assert (out.usage == 1).all()
    assert two_levels < 0.2 * one_level and two_levels < 0.05 * (x - x.mean(0)).pow(2).sum(-1).mean()
    assert torch.allclose(rq.embed_sum_ema / rq.cluster_size_ema.unsqueeze(-1), rq.codebooks, atol=1e-5)


def test_residual_beats_product_codes_when_the_variance_is_in_a_few_dimensions():
    """All of the tokens' spread lies in the first 4 of 8 dimensions: a product code wastes its
    second codebook on the empty half, the residual code refines the whole vector."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(4000, 4), torch.zeros(4000, 4)], dim=1)
    errors = {}
    for cls in (ProductQuantizer, ResidualQuantizer):
        quantizer = cls(8, num_codebooks=2, codebook_size=16)
        quantizer.init_kmeans(x, seed=0)
        errors[cls] = (quantizer.eval()(x).quantized - x).pow(2).sum(-1).mean()
    assert errors[ResidualQuantizer] < 0.7 * errors[ProductQuantizer]


def test_residual_ema_learns_and_eval_changes_nothing():
    """Training steps move the codebooks towards the data (lower error); eval steps move nothing."""
    torch.manual_seed(3)
    x = torch.randn(512, 6) * 2
    rq = ResidualQuantizer(6, num_codebooks=2, codebook_size=8)
    rq.train()(x)  # lazy data init, level by level
    before = (rq.eval()(x).quantized - x).pow(2).mean()
    rq.train()
    for _ in range(30):
        rq(x)
    state = {k: v.clone() for k, v in rq.state_dict().items()}
    after = (rq.eval()(x).quantized - x).pow(2).mean()
    assert after < before
    assert all(torch.equal(state[k], v) for k, v in rq.state_dict().items())
    assert rq.codebooks.shape == (2, 8, 6)


def test_residual_quantizer_needs_no_divisible_dimension():
    assert ResidualQuantizer(10, num_codebooks=3, codebook_size=4).lookup(torch.zeros(2, 3, dtype=torch.int64)).shape == (2, 10)


def test_cached_search_terms_follow_every_change_of_the_codebooks():
    """Serving caches the codebooks' search terms: a load, an in-place write or a move must not
    leave codes assigned with the old codebooks."""
    torch.manual_seed(0)
    quantizer = ProductQuantizer(8, 2, 16).eval()
    x = torch.randn(30, 8)

    def brute_force(q):
        sub = q._split(x.to(q.codebooks.dtype))
        return torch.stack([torch.cdist(sub[m], q.codebooks[m]).argmin(-1) for m in range(q.num_codebooks)])

    assert torch.equal(quantizer.assign(x)[1], brute_force(quantizer))
    other = ProductQuantizer(8, 2, 16)
    quantizer.load_state_dict(other.state_dict())
    assert torch.equal(quantizer.assign(x)[1], brute_force(quantizer))
    with torch.no_grad():
        quantizer.codebooks.mul_(-1)
    assert torch.equal(quantizer.assign(x)[1], brute_force(quantizer))
    quantizer.to(torch.float64)
    assert torch.equal(quantizer.assign(x)[1], brute_force(quantizer))


def test_nearest_keeps_the_distances_of_the_plain_formula_to_the_bit():
    """The serving path folds -2 into cached codebooks; the distances it ranks are the floats of
    ``||a||^2 - 2 a.b + ||b||^2`` computed plainly, so no code moves, near ties included."""
    torch.manual_seed(1)
    quantizer = ProductQuantizer(16, 2, 64).eval()
    sub = quantizer._split(torch.randn(500, 16))
    books = quantizer.codebooks
    plain = (sub.pow(2).sum(-1, keepdim=True) - 2 * torch.bmm(sub, books.transpose(1, 2))
             + books.pow(2).sum(-1).unsqueeze(1))
    scaled, book_sq = quantizer._search_terms(None, torch.float32)
    folded = sub.pow(2).sum(-1, keepdim=True) + torch.bmm(sub, scaled) + book_sq
    assert torch.equal(plain, folded)
    assert torch.equal(quantizer.nearest(sub), plain.argmin(-1))
