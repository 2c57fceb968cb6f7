"""Product quantisation of token vectors, with codebooks learned by EMA (SparCode's Quantizer).

SparCode (Su et al., SIGIR 2023) precomputes the interaction encoder's score for every code a
user token can take, so a token must be snapped to a finite set of codes. Each token of
dimension ``D`` is split into ``M`` sub-vectors of ``D / M``. Sub-vector ``m`` is replaced by its
nearest entry of codebook ``m``, which has ``N`` entries. A token's code is the tuple
``(c_1, ..., c_M)``, and there are ``N ** M`` of them. All tokens of all users share the codebooks.
:class:`ResidualQuantizer` keeps the codes and everything below, but its ``M`` codebooks quantise
the whole token in turn, each what the ones before it left over.

Why the design is as it is:

* **Straight-through estimator.** ``argmin`` has no gradient. The forward value is the codebook
  vector, but the gradient passes to the token unchanged, so the ranking loss still trains the
  tokenizer. (The MindSpore port omits this, leaving the tokenizer with only the commitment
  gradient; see ``shared/reference/sparcode_inttower_mvke.md`` section 1.5.)
* **EMA codebooks.** The codebooks are buffers, not parameters. Each entry tracks an exponential
  moving average of the sub-vectors assigned to it (a running k-means), which is more stable than
  training the codebooks by gradient. The encoder only sees the commitment term
  ``commitment * ||x - sg(q)||^2``, which keeps the tokens near their codes.
* **Dead-code restart.** An entry that stops winning never moves again under EMA, and it wastes
  one of the ``N`` codes. When an entry's EMA cluster size falls below ``dead_threshold``, it is
  moved onto a random sub-vector of the current batch, with a little noise so that two restarted
  entries do not tie.
* **Data-dependent initialisation.** Random codebooks may lie far from the tokens, so one entry
  wins everything. By default the first training batch seeds each codebook with a random subset
  of its sub-vectors.

All randomness comes from torch's global generator, so results are reproducible under
``torch.manual_seed``. With data-parallel training, the EMA statistics are per process: nothing
here all-reduces them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crosstower.train.distributed import several_ranks, sum_over_ranks

# Largest number of distance entries (M * rows * N) formed at once by the nearest-entry search.
_SEARCH_BUDGET = 1 << 24
# Noise added to restarted or initial entries, relative to the sub-vectors' standard deviation.
_RESTART_NOISE = 1e-2


@dataclass
class QuantizerOutput:
    """What :meth:`ProductQuantizer.forward` returns.

    ``quantized`` has the shape of the input and a straight-through gradient; ``codes`` is
    ``[..., M]`` int64; ``loss`` is the scalar commitment loss (add it to the training loss);
    ``perplexity`` and ``usage`` are detached ``[M]`` statistics of this batch.
    """

    quantized: Tensor
    codes: Tensor
    loss: Tensor
    perplexity: Tensor
    usage: Tensor


class ProductQuantizer(nn.Module):
    """Split ``[..., dim]`` vectors into ``num_codebooks`` sub-vectors and snap each to its codebook.

    Buffers (in the state dict): ``codebooks [M, N, D/M]``, ``cluster_size_ema [M, N]``,
    ``embed_sum_ema [M, N, D/M]`` and ``initialized`` (whether the data-dependent init has run).
    Keep the module in float32 or float64: EMA statistics in half precision drift.
    """

    # Each codebook quantises its own slice of the vector (``D / M`` wide); the residual
    # quantiser below instead quantises the whole vector at every level.
    splits_dim = True

    def __init__(
        self,
        dim: int,
        num_codebooks: int = 2,
        codebook_size: int = 256,
        decay: float = 0.99,
        eps: float = 1e-5,
        commitment: float = 0.25,
        restart_dead: bool = True,
        dead_threshold: float = 1e-3,
        data_init: bool = True,
        init_std: float = 0.02,
    ):
        """``dead_threshold`` is in assigned sub-vectors per batch (EMA).

        A new or restarted entry starts at a cluster size of 1. It therefore has about
        ``log(1 / dead_threshold) / (1 - decay)`` steps (690 with the defaults) to win before it
        is restarted. With ``data_init`` the first training batch seeds the codebooks. Without
        it, they stay at ``N(0, init_std^2)``.
        """
        super().__init__()
        _check_args(dim, num_codebooks, codebook_size, decay, eps, commitment, dead_threshold, self.splits_dim)
        self.dim = dim
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size
        self.sub_dim = dim // num_codebooks if self.splits_dim else dim
        self.decay = decay
        self.eps = eps
        self.commitment = commitment
        self.restart_dead = restart_dead
        self.dead_threshold = dead_threshold
        self.data_init = data_init
        codebooks = torch.randn(num_codebooks, codebook_size, self.sub_dim) * init_std
        self.register_buffer("codebooks", codebooks)
        self.register_buffer("cluster_size_ema", torch.ones(num_codebooks, codebook_size))
        self.register_buffer("embed_sum_ema", codebooks.clone())
        self.register_buffer("initialized", torch.tensor(not data_init))
        self._last: dict[str, Tensor] = {}
        self._search_cache: tuple | None = None  # ((data_ptr, version, dtype), -2 B^T, entry norms)
        self._window: dict[str, Tensor] = {}  # counts and restarts since the last window_stats()

    # ------------------------------------------------------------------ code arithmetic
    @property
    def num_codes(self) -> int:
        """Number of distinct code tuples, ``N ** M`` (the number of rows of SparCode's score table)."""
        return self.codebook_size**self.num_codebooks

    def code_ids(self, codes: Tensor) -> Tensor:
        """``[..., M]`` code tuples -> ``[...]`` int64 ids, ``sum_m codes[m] * N^(M-1-m)`` (mixed radix)."""
        self._check_codes_shape(codes)
        ids = torch.zeros(codes.shape[:-1], dtype=torch.int64, device=codes.device)
        for m in range(self.num_codebooks):
            ids = ids * self.codebook_size + codes[..., m].long()
        return ids

    def codes_from_ids(self, ids: Tensor) -> Tensor:
        """Inverse of :meth:`code_ids`: ``[...]`` ids in ``[0, num_codes)`` -> ``[..., M]`` int64 codes."""
        rest = ids.long()
        digits = []
        for _ in range(self.num_codebooks):
            digits.append(rest % self.codebook_size)
            rest = torch.div(rest, self.codebook_size, rounding_mode="floor")
        return torch.stack(digits[::-1], dim=-1)

    def lookup(self, codes: Tensor) -> Tensor:
        """Reconstruct ``[..., M]`` codes as ``[..., D]`` vectors (the concatenated codebook entries):
        one gather from the flattened codebooks, entry ``m * N + code`` of codebook ``m``."""
        self._check_codes_shape(codes)
        offsets = torch.arange(0, self.num_codebooks * self.codebook_size, self.codebook_size, device=codes.device)
        flat = self.codebooks.reshape(-1, self.codebooks.shape[-1])
        return F.embedding(codes.long() + offsets, flat).reshape(*codes.shape[:-1], self.dim)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> QuantizerOutput:
        """Quantise ``x [..., D]``. In training mode, also update the codebooks by EMA.

        The statistics are updated after this batch's codes are chosen. So the returned
        ``quantized`` uses the codebooks as they were when the call started, unless the lazy
        data-dependent init ran in this call.
        """
        if x.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects last dimension {self.dim}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        if self.training and x.numel() > 0 and not bool(self.initialized):
            self.init_from(x.detach())
        sub, codes = self.assign(x.detach())  # [M, R, d], [M, R]
        codes_out = codes.t().reshape(*lead, self.num_codebooks)
        q = self.lookup(codes_out).to(x.dtype)
        loss = self.commitment * F.mse_loss(x, q.detach()) if x.numel() else x.sum() * 0.0
        counts = self._counts(codes)
        perplexity, usage = _perplexity(counts), (counts > 0).float().mean(-1)
        if self.training and (sub.shape[1] > 0 or several_ranks()):  # every rank joins the update's sum
            restarted = self._update(sub, codes, counts)
            self._last = {"perplexity": perplexity, "usage": usage, "restarted": restarted}
            self._window = {
                "counts": self._window.get("counts", 0) + counts,
                "restarted": self._window.get("restarted", 0) + restarted,
            }
        # Straight-through: the value is exactly q (x - x.detach() is exactly 0); d quantized / d x = I.
        quantized = q.detach() + (x - x.detach())
        return QuantizerOutput(quantized, codes_out, loss, perplexity, usage)

    @torch.no_grad()
    def assign(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """What each codebook quantises and the entry it picks: ``x [..., D]`` -> the
        ``[M, R, d]`` inputs of the codebooks (here the sub-vectors) and their codes ``[M, R]``."""
        sub = self._split(x)
        return sub, self.nearest(sub)

    @torch.no_grad()
    def nearest(self, sub: Tensor, books: Tensor | None = None) -> Tensor:
        """Exact nearest entries: ``sub [M, R, d]`` -> codes ``[M, R]`` int64, row ``m`` searched in
        ``books[m]`` (default: this quantiser's codebooks).

        Uses ``||a||^2 - 2 a.b + ||b||^2`` with a batched matmul per codebook, over row chunks,
        in at least float32 (autocast is disabled: half precision would mis-rank near ties); the
        ``-2`` is folded into the codebooks (a power of two: the same floats). A serving query is
        a handful of rows, where the fixed cost of the call is the cost: the terms of this
        quantiser's own codebooks are kept until the codebooks change, and a call that fits one
        chunk runs without the loop.
        """
        dtype = torch.promote_types(torch.promote_types(sub.dtype, (self.codebooks if books is None else books).dtype),
                                    torch.float32)
        scaled, book_sq = self._search_terms(books, dtype)  # -2 B^T [M, d, N], ||b||^2 [M, 1, N]

        def nearest_of(chunk: Tensor) -> Tensor:
            chunk = chunk.to(dtype)
            return (chunk.pow(2).sum(-1, keepdim=True) + torch.bmm(chunk, scaled) + book_sq).argmin(-1)

        if _tracing():  # one graph for any batch size (export): no loop over a batch-dependent chunk count
            return nearest_of(sub)
        rows = max(1, _SEARCH_BUDGET // (scaled.shape[0] * self.codebook_size))
        if sub.shape[1] == 0:
            return torch.zeros(scaled.shape[0], 0, dtype=torch.int64, device=sub.device)
        autocast = torch.is_autocast_enabled(sub.device.type)
        with torch.autocast(device_type=sub.device.type, enabled=False) if autocast else contextlib.nullcontext():
            out = [nearest_of(sub[:, start : start + rows]) for start in range(0, sub.shape[1], rows)]
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def _search_terms(self, books: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``-2 B^T`` ``[M, d, N]`` and the squared entry norms ``[M, 1, N]`` of ``books`` (default:
        the codebooks) in ``dtype``. Out of training, those of the own codebooks are cached while
        their storage and version (torch's counter of in-place writes) stay the same; in training
        they are computed afresh (a collective that overwrites the codebooks of another rank
        need not count as a write)."""
        if books is not None or self.training or _tracing():
            books = (self.codebooks if books is None else books).to(dtype)
            return -2 * books.transpose(1, 2), books.pow(2).sum(-1).unsqueeze(1)
        key = (self.codebooks.data_ptr(), self.codebooks._version, dtype)
        if self._search_cache is None or self._search_cache[0] != key:
            own = self.codebooks.detach().to(dtype)
            self._search_cache = (key, -2 * own.transpose(1, 2), own.pow(2).sum(-1).unsqueeze(1))
        return self._search_cache[1], self._search_cache[2]

    # ------------------------------------------------------------------ codebook learning
    @torch.no_grad()
    def init_from(self, vectors: Tensor) -> None:
        """Seed each codebook with random rows of what it quantises (``vectors [..., D]``'s
        sub-vectors) and reset the EMA.

        If there are fewer rows than entries, rows are drawn with replacement. The small noise
        that is always added keeps duplicate entries apart.
        """
        x = vectors.detach().to(self.codebooks.dtype)
        if x.numel() == 0:
            raise ValueError(f"{type(self).__name__}.init_from needs at least one vector")
        n = self.codebook_size
        for m in range(self.num_codebooks):
            level = self._level_input(x, m)  # [R, d], after the codebooks before m are set
            rows = level.shape[0]
            if rows >= n:
                pick = torch.randperm(rows, device=level.device)[:n]
            else:
                pick = torch.randint(rows, (n,), device=level.device)
            self.codebooks[m] = level[pick] + _noise(level, (n, self.sub_dim))
        self.cluster_size_ema.fill_(1.0)
        self.embed_sum_ema.copy_(self.codebooks)
        self.initialized.fill_(True)

    @torch.no_grad()
    def init_kmeans(self, vectors: Tensor, iterations: int = 20, seed: int = 0) -> None:
        """Set each codebook to the k-means centroids of what it quantises of ``vectors [..., D]``.

        SparCode warms up without quantisation; the tokens it has then learned are spread over
        the space the ranking needs, and k-means on them gives codebooks whose every entry is in
        use. Random or first-batch seeding of codebooks for tokens that are still moving instead
        lets a few entries win everything (measured: 3 of 256 in use after one epoch). The EMA
        cluster sizes start at each centroid's share of one batch-sized slice, so that no entry
        looks dead before it had a chance to win. k-means is faiss's (``faiss.Kmeans``).
        """
        import faiss

        x = vectors.detach().to(self.codebooks.dtype)
        rows = x.numel() // self.dim
        if rows < self.codebook_size:
            raise ValueError(f"k-means initialisation needs at least {self.codebook_size} vectors, got {rows}")
        for m in range(self.num_codebooks):
            data = np.ascontiguousarray(self._level_input(x, m).to(torch.float32).cpu().numpy())
            kmeans = faiss.Kmeans(self.sub_dim, self.codebook_size, niter=iterations, seed=seed + m, verbose=False)
            kmeans.train(data)
            _, assigned = kmeans.index.search(data, 1)
            share = np.bincount(assigned[:, 0], minlength=self.codebook_size) / rows
            self.codebooks[m] = torch.from_numpy(kmeans.centroids).to(self.codebooks)
            self.cluster_size_ema[m] = torch.from_numpy(share).to(self.cluster_size_ema) * self.codebook_size
        self.embed_sum_ema.copy_(self.codebooks * self.cluster_size_ema.unsqueeze(-1))
        self.initialized.fill_(True)

    def _level_input(self, x: Tensor, m: int) -> Tensor:
        """What codebook ``m`` quantises of ``x [..., D]``, as ``[R, d]``: sub-vector ``m``."""
        return self._split(x)[m]

    @torch.no_grad()
    def _update(self, sub: Tensor, codes: Tensor, counts: Tensor) -> Tensor:
        """EMA step on this batch, then restart dead entries; returns the ``[M]`` restart counts.

        Under several training processes the counts and sums are the global batch's (summed over
        the ranks); a restart draws from the rank's own rows, and the trainer then gives every
        rank rank 0's codebooks."""
        m, n, d = self.num_codebooks, self.codebook_size, self.sub_dim
        sub = sub.to(self.codebooks.dtype)
        flat = (codes + torch.arange(m, device=codes.device).unsqueeze(1) * n).reshape(-1)
        sums = torch.zeros(m * n, d, dtype=sub.dtype, device=sub.device).index_add_(0, flat, sub.reshape(-1, d))
        counts = counts.to(sub.dtype)  # a copy: the caller's counts stay this rank's statistics
        sum_over_ranks(counts, sums)
        self.cluster_size_ema.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum_ema.mul_(self.decay).add_(sums.view(m, n, d), alpha=1 - self.decay)
        self.codebooks.copy_(self.embed_sum_ema / self._smoothed_sizes().unsqueeze(-1))
        if not self.restart_dead or sub.shape[1] == 0:
            return torch.zeros(m, dtype=torch.int64, device=sub.device)
        return self._restart(sub)

    def _smoothed_sizes(self) -> Tensor:
        """Laplace-smoothed cluster sizes, so that an empty cluster does not divide by zero."""
        total = self.cluster_size_ema.sum(-1, keepdim=True)
        return (self.cluster_size_ema + self.eps) / (total + self.codebook_size * self.eps) * total

    def _restart(self, sub: Tensor) -> Tensor:
        """Move entries whose EMA cluster size is below ``dead_threshold`` onto random batch sub-vectors.

        A candidate is drawn for every entry, dead or not. This keeps the random stream
        independent of the data and avoids a device sync. A restarted entry gets cluster size 1,
        as if one vector had just been assigned to it.
        """
        m, n = self.num_codebooks, self.codebook_size
        dead = self.cluster_size_ema < self.dead_threshold  # [M, N]
        pick = torch.randint(sub.shape[1], (m, n), device=sub.device)
        candidates = sub[torch.arange(m, device=sub.device).unsqueeze(1), pick]  # [M, N, d]
        candidates = candidates + _noise(sub, candidates.shape, per_codebook=True)
        self.codebooks.copy_(torch.where(dead.unsqueeze(-1), candidates, self.codebooks))
        self.embed_sum_ema.copy_(torch.where(dead.unsqueeze(-1), candidates, self.embed_sum_ema))
        self.cluster_size_ema.masked_fill_(dead, 1.0)
        return dead.sum(-1)

    # ------------------------------------------------------------------ statistics
    def stats(self) -> dict[str, float]:
        """Summary for logging: the last training batch's statistics, plus EMA liveness.

        ``usage`` / ``perplexity`` are means over codebooks (``*_min``: the worst codebook).
        ``restarted`` counts entries restarted in that batch. ``live`` is the fraction of entries
        whose EMA cluster size is at least ``dead_threshold``. It summarises many batches, not
        just the last one.
        """
        if not self._last:
            return self._summary()
        return self._summary(self._last["usage"], self._last["perplexity"], self._last["restarted"])

    def window_stats(self) -> dict[str, float]:
        """Usage, perplexity and restarts over every training batch since the previous call (an
        epoch, when called once per epoch), then start a new window.

        The last batch alone can mislead: an epoch's last batch may hold a handful of rows, which
        can use only a handful of entries.
        """
        window, self._window = self._window, {}
        if not window:
            return self._summary()
        counts = window["counts"]
        return self._summary((counts > 0).float().mean(-1), _perplexity(counts), window["restarted"])

    def _summary(
        self, usage: Tensor | None = None, perplexity: Tensor | None = None, restarted: Tensor | None = None
    ) -> dict[str, float]:
        """The logged numbers: per-codebook ``[M]`` usage and perplexity as mean and worst, the
        restart count, and the EMA liveness (alone when there are no batch statistics)."""
        live = (self.cluster_size_ema >= self.dead_threshold).float().mean().item()
        if usage is None:
            return {"live": live}
        return {
            "usage": usage.mean().item(),
            "usage_min": usage.min().item(),
            "perplexity": perplexity.mean().item(),
            "perplexity_min": perplexity.min().item(),
            "restarted": float(restarted.sum().item()),
            "live": live,
        }

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, "
            f"decay={self.decay}, commitment={self.commitment}, restart_dead={self.restart_dead}"
        )

    # ------------------------------------------------------------------ helpers
    def _split(self, x: Tensor) -> Tensor:
        """``[..., D]`` -> ``[M, R, D/M]`` with ``R`` the number of vectors."""
        rows = x.numel() // self.dim
        return x.reshape(rows, self.num_codebooks, self.sub_dim).transpose(0, 1)

    def _counts(self, codes: Tensor) -> Tensor:
        """How many rows chose each entry: ``codes [M, R]`` -> ``[M, N]`` int64."""
        m, n = self.num_codebooks, self.codebook_size
        flat = (codes + torch.arange(m, device=codes.device).unsqueeze(1) * n).reshape(-1)
        return torch.bincount(flat, minlength=m * n).view(m, n)

    def _check_codes_shape(self, codes: Tensor) -> None:
        if codes.shape[-1:] != (self.num_codebooks,):
            raise ValueError(f"codes must have last dimension {self.num_codebooks}, got shape {tuple(codes.shape)}")


class ResidualQuantizer(ProductQuantizer):
    """Residual vector quantisation: ``M`` codebooks of ``N`` whole-``D`` entries, applied in turn.

    Level 1 snaps the token to its nearest entry of codebook 1, level ``m`` snaps what the
    levels before it left over (the residual), and the reconstruction is the sum of the ``M``
    chosen entries. A code is still a tuple ``(c_1, ..., c_M)`` with ``N ** M`` values, so the
    index, the code ids and the fallback to the nearest built code are unchanged. Why offer it:
    a product code spends each codebook on a fixed ``D / M`` slice, whatever the tokens'
    variance is along it; residual levels refine the whole vector, coarse to fine, and usually
    reconstruct it better at the same ``N`` and ``M``. The greedy level-by-level choice is not
    the jointly nearest tuple (that would need a search over all ``N ** M``), as is usual.

    Everything else (EMA per level on that level's inputs, dead-entry restart, straight-through
    gradient, commitment loss, k-means initialisation level by level) is
    :class:`ProductQuantizer`'s, applied to the levels' inputs instead of the sub-vectors.
    """

    splits_dim = False

    def lookup(self, codes: Tensor) -> Tensor:
        """Reconstruct ``[..., M]`` codes as ``[..., D]`` vectors (the sum of the chosen entries)."""
        self._check_codes_shape(codes)
        books = torch.arange(self.num_codebooks, device=codes.device)
        return self.codebooks[books, codes.long()].sum(-2)

    @torch.no_grad()
    def assign(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Greedy level by level: ``x [..., D]`` -> each level's inputs ``[M, R, D]`` and codes ``[M, R]``."""
        residual = x.reshape(-1, self.dim)
        inputs, codes = [], []
        for m in range(self.num_codebooks):
            inputs.append(residual)
            code, residual = self._snap(residual, m)
            codes.append(code)
        return torch.stack(inputs), torch.stack(codes)

    def _level_input(self, x: Tensor, m: int) -> Tensor:
        """What codebook ``m`` quantises: ``x`` less the entries levels ``< m`` chose, ``[R, D]``."""
        residual = x.reshape(-1, self.dim)
        for level in range(m):
            _, residual = self._snap(residual, level)
        return residual

    def _snap(self, residual: Tensor, m: int) -> tuple[Tensor, Tensor]:
        """Level ``m``'s codes ``[R]`` for ``residual [R, D]`` and what it leaves over."""
        code = self.nearest(residual.unsqueeze(0), self.codebooks[m : m + 1])[0]
        return code, residual - self.codebooks[m, code].to(residual.dtype)


def _perplexity(counts: Tensor) -> Tensor:
    """``exp(entropy)`` of each row's code histogram: ``[M, N]`` counts -> ``[M]`` (1.0 for an empty batch)."""
    p = counts.float() / counts.sum(-1, keepdim=True).clamp_min(1).float()
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    return entropy.exp()


def _noise(sub: Tensor, shape: tuple[int, ...] | torch.Size, per_codebook: bool = False) -> Tensor:
    """Small Gaussian noise, scaled by the sub-vectors' spread (per codebook if ``per_codebook``)."""
    if per_codebook:
        scale = sub.std(dim=(1, 2), unbiased=False).view(-1, 1, 1)
    else:
        scale = sub.std(unbiased=False)
    return torch.randn(shape, dtype=sub.dtype, device=sub.device) * (scale * _RESTART_NOISE + 1e-6)


def _check_args(
    dim: int, num_codebooks: int, codebook_size: int, decay: float, eps: float, commitment: float, dead_threshold: float,
    splits_dim: bool = True,
) -> None:
    if num_codebooks < 1 or codebook_size < 1 or dim < 1:
        raise ValueError(
            "ProductQuantizer needs dim, num_codebooks and codebook_size >= 1, "
            f"got {dim}, {num_codebooks}, {codebook_size}"
        )
    if splits_dim and dim % num_codebooks:
        raise ValueError(
            f"ProductQuantizer: dim={dim} is not divisible by num_codebooks={num_codebooks}; "
            "each codebook quantises an equal slice of dim / num_codebooks"
        )
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ProductQuantizer: decay must be in [0, 1), got {decay}")
    if eps <= 0 or commitment < 0 or dead_threshold < 0:
        raise ValueError(
            "ProductQuantizer: need eps > 0, commitment >= 0, dead_threshold >= 0; "
            f"got {eps}, {commitment}, {dead_threshold}"
        )
    if codebook_size**num_codebooks >= 2**63:
        raise ValueError(
            f"ProductQuantizer: codebook_size**num_codebooks = {codebook_size}**{num_codebooks} "
            "overflows int64 code ids"
        )


def _tracing() -> bool:
    """Whether torch.export or torch.compile is tracing the call (no data pointers, one graph)."""
    return torch.compiler.is_exporting() or torch.compiler.is_compiling()
