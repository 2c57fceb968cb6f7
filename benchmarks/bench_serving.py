"""Serving speed: SparCode's sparse code index against the two-tower model served by brute force
and by faiss, side by side in one process (issue 3, item 7).

Run (the reference configuration; run it alone on the machine, the 1M build takes minutes):

    python benchmarks/bench_serving.py --sizes 10000 100000 1000000 --threads 1

Quick look (seconds):

    python benchmarks/bench_serving.py --sizes 10000 --queries 200 --batches 3

Trained models instead of random ones (``benchmarks/million_items.py`` runs it on its two runs):

    python benchmarks/bench_serving.py --runs TWO_TOWER_RUN SPARCODE_RUN --threads 1

Writes ``benchmarks/out/serving.json`` (``--out``) and prints one table per catalogue size.

With ``--runs``, two finished runs on one data set replace the synthetic workloads: the two-tower
run's trained item vectors are behind every two-tower method (its user tower encodes the
queries), the SparCode run's own saved index (and its tokenizer and quantiser) behind both
SparCode methods; the queries are test users of the SparCode run's split (a sample seeded by
``--seed``), each read as its model reads it in evaluation (its history, example age 0), and
encoded as ``crosstower serve`` encodes a known user: by the query side's ONNX graph in
onnxruntime on ``--threads`` threads (``--eager``: in PyTorch). The
report adds each run's test Recall@k, exhaustive and served, its index and timing.

What is measured, per catalogue size N (synthetic, seeded; nothing is trained):

* Two-tower: random item vectors ``[N, D]`` (float32) and a user tower of the project's default
  size (``MLP [2D, 128, D]`` over a user-field embedding and the mean of 50 history item
  embeddings). Served by ``exact_torch`` (``torch.topk(u @ V.T)``), ``exact_index``
  (:class:`ExactInnerProductIndex`, the project's exact index with its tie rule), ``faiss_flat_ip``
  (``IndexFlatIP``) and ``faiss_hnsw`` (``IndexHNSWFlat``, inner product, M=32, efConstruction
  80, efSearch 128; ``--hnsw-m``, ``--ef-construction``, ``--ef-search``).
* SparCode: the same user input through a DNN tokenizer of the project's default size
  (``MLP [2D, 256, K_u * D]``, K_u = 4 tokens) and a :class:`ProductQuantizer` (M = 2 codebooks
  of 256); the index holds the ``--codes`` most frequent code tuples of 20,000 simulated training
  users (4,096 of the 65,536 possible), each keeping its top L items, L = min(1000, N // 100)
  (``--keep-per-code``), so about 1% (10k, 100k) or 0.1% (1M) of the code x item table is stored.
  The scores come from a random low-rank ReLU model with a popularity term (posting lists
  overlap and favour popular items, as trained ones do); building it is not what is timed, but
  its time and bytes are reported. Query tokens whose code was not indexed go through the index's
  nearest-code fallback, as in real serving (``query_tokens_unindexed`` says how many).
  ``sparcode_index`` serves with ``SparseCodeIndex.search``: one query at a time (batch 1) it sums
  only the K_u posting lists in per-thread work arrays; a batch goes through a dense or sparse
  accumulation. ``identical_to_index_search`` checks that the batch-1 answers equal the batched
  search's.

Every timed query is one user: ``encoder`` (tower / tokenizer + nearest codes, as serving
assigns them), then ``index`` (search); ``p50_ms`` / ``p99_ms`` are end to end (both), ``index_p50_ms`` /
``index_p99_ms`` the search alone, from the same calls. Batch-1 latency is over ``--queries``
users after ``--warmup`` warm-up queries, methods interleaved query by query (so drift of the
machine hits every method alike). Throughput is queries/s at batch ``--batch`` (256): the median
over ``--batches`` batches of distinct users, methods interleaved batch by batch. torch and faiss
use ``--threads`` threads for every measurement (builds use ``--build-threads``). With
``--threads 1`` (the reference) no library keeps worker threads. With more, note that the faiss-cpu
wheel bundles its own OpenMP runtime beside torch's: each one's idle workers spin for a while
after a call and slow whichever library runs next (on a busy 2-core machine, 2 threads, a faiss
search added 1-3 ms to the torch call after it). That is a real cost of serving a torch tower and a faiss index in
one process, but it depends on the machine; ``OMP_WAIT_POLICY=PASSIVE`` trades the spinning for
wake-up latency. The environment variables that steer this are recorded under ``machine.env``.

``recall@50``: for two-tower methods, the share of the exact top-50 (``ExactInnerProductIndex``
on the very user vectors the method served) that the method returned. For SparCode methods, the
share of returned items whose accumulated score is at least the 50th best score of the dense
reference (``SparseCodeIndex.dense_scores``), i.e. tie-aware agreement with the index's exact
answer (1.0 = exact). It is not a recommendation-quality metric: the data are random.

``bar`` (per size): the issue's bar, SparCode's batch-1 p50 at most faiss ``IndexFlatIP``'s in
the same run (stated for 1M items), end to end and index only, for both SparCode methods.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from torch import nn

from crosstower.environment import describe_environment, source_revision
from crosstower.files import write_json
from crosstower.data.batching import UserInput as ModelInput
from crosstower.data.batching import eval_user_input
from crosstower.index import CodeQueries, ExactInnerProductIndex, SparseCodeIndex, encode_code_ids
from crosstower.query_graph import compiled_queries
from crosstower.nn.fields import MLP
from crosstower.nn.quantizer import ProductQuantizer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "out" / "serving.json"
DEFAULT_SIZES = (10_000, 100_000, 1_000_000)

# The project's default tower sizes (DSSMConfig.user_hidden, SparCodeConfig.tokenizer_hidden).
TWO_TOWER_HIDDEN = [128]
TOKENIZER_HIDDEN = [256]
USER_VOCAB = 1_000  # values of the one user field (think age x region); Zipf-distributed
HISTORY = 50  # history items per user (train.history_length of the configs)
SCORE_RANK = 16  # rank of the synthetic code x item score model
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
DENSE_BUDGET = 1 << 26  # floats per dense block when building the index or its reference (256 MB)


@dataclass
class Settings:
    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    dim: int = 64
    k: int = 50
    user_tokens: int = 4
    num_codebooks: int = 2
    codebook_size: int = 256
    codes: int = 4096
    keep_per_code: int = 0  # 0: min(1000, N // 100)
    train_users: int = 20_000
    queries: int = 200
    warmup: int = 20
    batch: int = 256
    batches: int = 5
    threads: int = 1
    build_threads: int = 0  # 0: every core
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    seed: int = 0
    methods: list[str] | None = None  # None: all
    eager: bool = False  # --runs: encode queries in PyTorch instead of the compiled query graph
    data_dir: str | None = None  # --runs: the folder their data set is in (as `crosstower run --data-dir`)

    def keep_for(self, num_items: int) -> int:
        return self.keep_per_code or max(1, min(1000, num_items // 100))


ALL_METHODS = ("exact_torch", "exact_index", "faiss_flat_ip", "faiss_hnsw", "sparcode_index")


# ------------------------------------------------------------------------------------ workload


@dataclass
class Users:
    """Raw user input, identical for both models: one user-field id and a history of item ids."""

    field_ids: torch.Tensor  # int64 [U]
    history: torch.Tensor  # int64 [U, HISTORY]

    def __len__(self) -> int:
        return len(self.field_ids)

    def slice(self, lo: int, hi: int) -> Users:
        return Users(self.field_ids[lo:hi], self.history[lo:hi])


def draw_users(num: int, num_items: int, gen: torch.Generator) -> Users:
    """Users with a Zipf-distributed field value and a uniformly random history."""
    ranks = torch.arange(1, USER_VOCAB + 1, dtype=torch.float64)
    field_ids = torch.multinomial(1.0 / ranks, num, replacement=True, generator=gen)
    history = torch.randint(num_items, (num, HISTORY), generator=gen)
    return Users(field_ids, history)


class UserInput(nn.Module):
    """What both towers read: ``[user-field embedding; mean history item embedding]`` (2D)."""

    def __init__(self, num_items: int, dim: int):
        super().__init__()
        self.fields = nn.Embedding(USER_VOCAB, dim)
        self.items = nn.Embedding(num_items, dim)

    def forward(self, users: Users) -> torch.Tensor:
        return torch.cat([self.fields(users.field_ids), self.items(users.history).mean(1)], dim=-1)


class UserTower(nn.Module):
    """The two-tower user tower: input -> MLP -> user vector [B, D]."""

    def __init__(self, inputs: UserInput, dim: int):
        super().__init__()
        self.inputs = inputs
        self.mlp = MLP([2 * dim, *TWO_TOWER_HIDDEN, dim])

    def forward(self, users: Users) -> torch.Tensor:
        return self.mlp(self.inputs(users))


class CodeTokenizer(nn.Module):
    """SparCode's user side: input -> DNN tokenizer (K_u tokens) -> product quantizer -> codes."""

    def __init__(self, inputs: UserInput, dim: int, tokens: int, quantizer: ProductQuantizer):
        super().__init__()
        self.inputs, self.tokens, self.dim = inputs, tokens, dim
        self.mlp = MLP([2 * dim, *TOKENIZER_HIDDEN, tokens * dim])
        self.quantizer = quantizer

    def tokenize(self, users: Users) -> torch.Tensor:
        return self.mlp(self.inputs(users)).view(len(users), self.tokens, self.dim)

    def forward(self, users: Users) -> CodeQueries:
        """As SparCode.serving_codes: each token's code and its quantised vector (the
        quantiser's training statistics, its loss and usage counts, are not computed)."""
        tokens = self.tokenize(users)
        _, codes = self.quantizer.assign(tokens)
        codes = codes.t().reshape(*tokens.shape[:-1], -1)
        return CodeQueries(codes, self.quantizer.lookup(codes))


class LowRankScores:
    """Synthetic ``score_codes``: ``ReLU(<P c, F_i> + pop_i)`` for a code's reconstruction vector c.

    Low rank makes posting lists of nearby codes overlap; the Zipf popularity term puts popular
    items into many lists; the ReLU zeroes about half the table, as a trained SparCode encoder's
    sparsity bias does. Scores are O(1), well inside float16.
    """

    def __init__(self, codebooks: torch.Tensor, num_items: int, rank: int, gen: torch.Generator):
        self.codebooks = codebooks.clone()  # [M, N, D/M]
        dim = codebooks.shape[0] * codebooks.shape[2]
        self.proj = torch.randn(dim, rank, generator=gen)
        self.item_factors = torch.randn(num_items, rank, generator=gen) / math.sqrt(rank)
        log_pop = -torch.log(torch.randperm(num_items, generator=gen).double() + 1.0)
        self.item_bias = (0.5 * (log_pop - log_pop.mean()) / log_pop.std()).float()

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        books = torch.arange(self.codebooks.shape[0])
        vectors = self.codebooks[books, codes.long()].reshape(len(codes), -1)
        vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return torch.relu((vectors @ self.proj) @ self.item_factors.T + self.item_bias)


@dataclass
class Method:
    """One way of serving: ``encode(users)`` -> query, ``search(query, k)`` -> items [B, k]."""

    name: str
    family: str  # "two_tower" or "sparcode"
    encode: Callable[[Users], Any]
    search: Callable[[Any, int], np.ndarray]
    index_bytes: int
    build_seconds: float
    info: dict[str, Any] = field(default_factory=dict)


def _items(result: Any) -> np.ndarray:
    items = result[1] if isinstance(result, tuple) else result
    return items.numpy() if isinstance(items, torch.Tensor) else np.asarray(items)


def _hnsw_bytes(index: faiss.IndexHNSWFlat) -> int:
    """Vectors plus graph (neighbour ids, per-node offsets and levels)."""
    h = index.hnsw
    return int(index.ntotal * index.d * 4 + h.neighbors.size() * 4 + h.offsets.size() * 8 + h.levels.size() * 4)


@dataclass
class Workload:
    """The serving methods of one catalogue size, plus the references their answers are checked by."""

    methods: list[Method]
    info: dict[str, Any]
    exact: ExactInnerProductIndex  # two-tower reference (and the ``exact_index`` method)
    sparse: SparseCodeIndex | None  # SparCode's index (None when no SparCode method was asked for)
    latency_users: Any  # the batch-1 queries (``len`` and ``slice(lo, hi)``)
    batch_users: Any  # the throughput batches, one after another


def two_tower_methods(
    item_vectors: np.ndarray, encode: Callable[[Any], torch.Tensor], s: Settings, log: Callable[[str], None] = print,
) -> tuple[list[Method], ExactInnerProductIndex]:
    """The wanted two-tower methods over ``item_vectors`` [N, D] (float32), each query encoded by
    ``encode``, and the exact index that is their recall reference."""
    wanted = set(s.methods or ALL_METHODS)
    n, d = item_vectors.shape
    methods: list[Method] = []
    if "exact_torch" in wanted:
        items_t = torch.from_numpy(item_vectors)

        def exact_torch(u: torch.Tensor, k: int) -> torch.Tensor:
            return torch.topk(u @ items_t.T, k, dim=1).indices

        methods.append(Method("exact_torch", "two_tower", encode, exact_torch, item_vectors.nbytes, 0.0))
    exact = ExactInnerProductIndex(item_vectors)  # also the two-tower recall reference
    if "exact_index" in wanted:
        methods.append(Method("exact_index", "two_tower", encode, lambda u, k: exact.search(u, k),
                              exact.nbytes(), exact.build_seconds))
    if "faiss_flat_ip" in wanted:
        t0 = time.perf_counter()
        flat = faiss.IndexFlatIP(d)
        flat.add(item_vectors)
        built = time.perf_counter() - t0
        methods.append(Method("faiss_flat_ip", "two_tower", encode,
                              lambda u, k: flat.search(u.numpy(), k)[1], int(flat.ntotal) * d * 4, built))
    if "faiss_hnsw" in wanted:
        log(f"  building HNSW (M={s.hnsw_m}, efConstruction={s.ef_construction}) over {n:,} vectors ...")
        t0 = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(d, s.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = s.ef_construction
        hnsw.add(item_vectors)
        built = time.perf_counter() - t0
        hnsw.hnsw.efSearch = max(s.ef_search, s.k)
        methods.append(Method("faiss_hnsw", "two_tower", encode,
                              lambda u, k: hnsw.search(u.numpy(), k)[1], _hnsw_bytes(hnsw), built,
                              {"M": s.hnsw_m, "efConstruction": s.ef_construction, "efSearch": hnsw.hnsw.efSearch}))
    return methods, exact


def sparcode_methods(sparse: SparseCodeIndex, encode: Callable[[Any], CodeQueries], s: Settings,
                     info: dict[str, Any]) -> list[Method]:
    """The wanted SparCode methods over ``sparse``, each query encoded by ``encode``."""
    wanted = set(s.methods or ALL_METHODS)
    methods = []
    if "sparcode_index" in wanted:
        methods.append(Method("sparcode_index", "sparcode", encode, lambda q, k: sparse.search(q, k),
                              sparse.nbytes(), sparse.build_seconds, info))
    return methods


def build_workload(n: int, s: Settings, log: Callable[[str], None] = print) -> Workload:
    """Every serving method for a catalogue of ``n`` items (seeded: same ``s`` and ``n``, same data)."""
    gen = torch.Generator().manual_seed(s.seed * 1_000_003 + n)
    torch.manual_seed(s.seed)  # the quantizer's init draws from the global generator
    wanted = set(s.methods or ALL_METHODS)
    d = s.dim
    inputs = UserInput(n, d)
    with torch.no_grad():
        inputs.fields.weight.copy_(torch.randn(USER_VOCAB, d, generator=gen))
        inputs.items.weight.copy_(torch.randn(n, d, generator=gen))
    tower = UserTower(inputs, d).eval()
    quantizer = ProductQuantizer(d, s.num_codebooks, s.codebook_size)
    tokenizer = CodeTokenizer(inputs, d, s.user_tokens, quantizer).eval()
    item_vectors = torch.randn(n, d, generator=gen).numpy()
    info: dict[str, Any] = {"num_items": n, "dim": d, "k": s.k}
    methods, exact = two_tower_methods(item_vectors, tower, s, log)

    # ---- SparCode: codebooks and indexed codes from simulated training users
    sparse = None
    if "sparcode_index" in wanted:
        t0 = time.perf_counter()
        with torch.no_grad():
            train = draw_users(s.train_users, n, gen)
            tokens = tokenizer.tokenize(train)
            quantizer.init_from(tokens)  # data-dependent codebooks, as training starts
            codes = quantizer(tokens).codes.reshape(-1, s.num_codebooks)
            ids = quantizer.code_ids(codes)
            uniq, counts = torch.unique(ids, return_counts=True)
            order = np.lexsort((uniq.numpy(), -counts.numpy()))[: s.codes]  # most frequent, then lower id
            kept = uniq[torch.from_numpy(np.sort(order))]
            index_codes = quantizer.codes_from_ids(kept)
            code_vectors = quantizer.lookup(index_codes)
        covered = float(counts[torch.from_numpy(order)].sum()) / len(ids)
        keep = s.keep_for(n)
        log(f"  building SparCode index: {len(index_codes):,} codes x top-{keep} of {n:,} items ...")
        scorer = LowRankScores(quantizer.codebooks, n, SCORE_RANK, gen)
        sparse = SparseCodeIndex.build(scorer, index_codes, code_vectors, n, s.codebook_size, keep=keep,
                                       code_chunk=max(1, DENSE_BUDGET // n), progress=False)
        sparse_info = {
            "codes_indexed": sparse.num_codes,
            "codes_seen_in_training": int(len(uniq)),
            "train_tokens_covered": round(covered, 4),
            "keep_per_code": keep,
            "kept_fraction": sparse.kept_fraction,
            "nnz": sparse.nnz,
            "code_selection_seconds": round(time.perf_counter() - t0 - sparse.build_seconds, 3),
        }
        info["sparcode"] = sparse_info
        per_method = {key: sparse_info[key] for key in ("codes_indexed", "keep_per_code", "kept_fraction")}
        methods += sparcode_methods(sparse, tokenizer, s, per_method)
    info["encoder_params"] = {
        "user_tower": sum(p.numel() for p in tower.mlp.parameters()),
        "tokenizer": sum(p.numel() for p in tokenizer.mlp.parameters()),
        "quantizer_codebooks": int(quantizer.codebooks.numel()),
    }
    gen = torch.Generator().manual_seed(s.seed * 7919 + n + 1)
    return Workload(methods, info, exact, sparse, draw_users(s.queries, n, gen),
                    draw_users(s.batch * s.batches, n, gen))


# ------------------------------------------------------------------------------------ trained runs


@dataclass
class RunUsers:
    """Users of a trained run, as each served model reads them (its own history length)."""

    inputs: dict[str, ModelInput]  # by method family

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def slice(self, lo: int, hi: int) -> RunUsers:
        return RunUsers({family: user.rows(slice(lo, hi)) for family, user in self.inputs.items()})


def trained_workload(two_tower_dir: Path, sparcode_dir: Path, s: Settings,
                     log: Callable[[str], None] = print) -> Workload:
    """The serving methods of two finished runs on one data set: the two-tower run's trained item
    vectors behind every two-tower method, the SparCode run's own saved index behind SparCode's.
    Queries are test users of the SparCode run's split, a sample seeded by ``s.seed``."""
    from crosstower.run_dir import open_run

    data_dir = None if s.data_dir is None else Path(s.data_dir)
    towers, codes = open_run(two_tower_dir, data_dir), open_run(sparcode_dir, data_dir)
    if towers.metrics.get("data") != codes.metrics.get("data"):
        raise SystemExit(f"error: {two_tower_dir} and {sparcode_dir} were trained on different data")
    sparse = codes.index()
    if not isinstance(sparse, SparseCodeIndex):
        raise SystemExit(f"error: {sparcode_dir}: expected a SparCode run with a sparse code index, "
                         f"got {type(sparse).__name__}")
    log(f"  encoding the catalogue of {towers.dataset.num_items:,} items with {two_tower_dir} ...")
    item_vectors = towers.model.item_vectors().numpy().astype(np.float32)
    test = codes.split.test
    rows = np.random.default_rng(s.seed).choice(len(test), min(len(test), s.queries + s.batch * s.batches),
                                                replace=False)

    def query_side(run: Any, family: str) -> Callable[[RunUsers], Any]:
        """As ``crosstower serve`` encodes a known user: the compiled query graph (``--eager``:
        PyTorch), reading the input of this model (``family``), which has its own history length."""
        encode = run.model.index_query
        if not s.eager:
            example = eval_user_input(test, rows[:2], run.config.train.history_length).history.numpy()
            encode = compiled_queries(run.model, example, s.threads) or encode
        return lambda users: encode(users.inputs[family])

    methods, exact = two_tower_methods(item_vectors, query_side(towers, "two_tower"), s, log)
    index_info = {"codes_indexed": sparse.num_codes, "kept_fraction": sparse.kept_fraction}
    methods += sparcode_methods(sparse, query_side(codes, "sparcode"), s, index_info)

    def users(picked: np.ndarray) -> RunUsers:  # the same test users and histories for both models
        return RunUsers({family: eval_user_input(test, picked, run.config.train.history_length)
                         for family, run in (("two_tower", towers), ("sparcode", codes))})

    info: dict[str, Any] = {
        "num_items": towers.dataset.num_items, "dim": item_vectors.shape[1], "k": s.k,
        "queries_by": "pytorch" if s.eager else "onnxruntime",
        "runs": {family: {"dir": str(run.folder.path), "model": run.config.model.name,
                          "metrics": {part: {key: value for key, value in run.metrics["metrics"].get(part, {}).items()
                                             if key.startswith(f"recall@{s.k}")}
                                      for part in ("test", "test_served")},
                          "index": run.metrics.get("index", {}), "timing": run.metrics.get("timing", {})}
                 for family, run in (("two_tower", towers), ("sparcode", codes))},
        "sparcode": {"codes_indexed": sparse.num_codes, "kept_fraction": sparse.kept_fraction, "nnz": sparse.nnz},
    }
    return Workload(methods, info, exact, sparse, users(rows[: s.queries]), users(rows[s.queries:]))


# ------------------------------------------------------------------------------------ timing


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure_latency(methods: list[Method], users: Users, warmup: int, k: int) -> dict[str, dict[str, Any]]:
    """Batch-1 latency, methods interleaved query by query (in rotating order)."""
    singles = [users.slice(i, i + 1) for i in range(len(users))]
    enc = {m.name: [] for m in methods}
    idx = {m.name: [] for m in methods}
    kept: dict[str, list[tuple[Any, np.ndarray]]] = {m.name: [] for m in methods}
    with torch.no_grad():
        for i in range(-warmup, len(singles)):
            user = singles[i % len(singles)]
            for j in range(len(methods)):
                m = methods[(i + j) % len(methods)]
                t0 = time.perf_counter_ns()
                query = m.encode(user)
                t1 = time.perf_counter_ns()
                result = m.search(query, k)
                t2 = time.perf_counter_ns()
                if i >= 0:
                    enc[m.name].append((t1 - t0) / 1e6)
                    idx[m.name].append((t2 - t1) / 1e6)
                    kept[m.name].append((query, _items(result)))
    out = {}
    for m in methods:
        total = [a + b for a, b in zip(enc[m.name], idx[m.name])]
        out[m.name] = {
            "p50_ms": _percentile(total, 50), "p99_ms": _percentile(total, 99),
            "index_p50_ms": _percentile(idx[m.name], 50), "index_p99_ms": _percentile(idx[m.name], 99),
            "encoder_p50_ms": _percentile(enc[m.name], 50),
            "_served": kept[m.name],
        }
    return out


def measure_throughput(
    methods: list[Method], users: Users, batch: int, batches: int, k: int
) -> dict[str, dict[str, float]]:
    """Queries/s at ``batch`` users per call: median over ``batches`` batches, after one warm-up."""
    blocks = [users.slice(lo, lo + batch) for lo in range(0, batch * batches, batch)]
    total = {m.name: [] for m in methods}
    index = {m.name: [] for m in methods}
    with torch.no_grad():
        for i in range(-1, len(blocks)):
            block = blocks[max(i, 0)]
            for j in range(len(methods)):
                m = methods[(i + j) % len(methods)]
                t0 = time.perf_counter()
                query = m.encode(block)
                t1 = time.perf_counter()
                m.search(query, k)
                t2 = time.perf_counter()
                if i >= 0:
                    total[m.name].append(t2 - t0)
                    index[m.name].append(t2 - t1)
    return {
        m.name: {
            f"qps_batch{batch}": batch / statistics.median(total[m.name]),
            f"index_qps_batch{batch}": batch / statistics.median(index[m.name]),
        }
        for m in methods
    }


# ------------------------------------------------------------------------------------ accuracy


def _stack(queries: list[Any]) -> Any:
    if isinstance(queries[0], CodeQueries):
        return CodeQueries(torch.cat([q.codes for q in queries]), torch.cat([q.vectors for q in queries]))
    return torch.cat(queries)


def two_tower_recall(exact: ExactInnerProductIndex, served: list[tuple[torch.Tensor, np.ndarray]], k: int) -> float:
    """Share of the exact top-k (on the very user vectors served) that the method returned."""
    users = _stack([q for q, _ in served])
    ref = exact.search(users, k)[1].numpy()
    got = np.concatenate([items for _, items in served])
    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(got, ref)]))


def sparcode_agreement(index: SparseCodeIndex, served: list[tuple[CodeQueries, np.ndarray]], k: int) -> dict[str, Any]:
    """Tie-aware recall against the dense reference, and whether the lists equal ``search``'s."""
    queries = _stack([q for q, _ in served])
    got = np.concatenate([items for _, items in served])
    block = max(1, DENSE_BUDGET // index.num_items)
    hits = []
    for lo in range(0, len(got), block):
        dense = index.dense_scores(queries.codes[lo : lo + block], queries.vectors[lo : lo + block])
        kth = torch.topk(dense, k, dim=1).values[:, -1:]
        mine = dense.gather(1, torch.from_numpy(got[lo : lo + block]).clamp_min(0))
        hits.append(((mine >= kth) & torch.from_numpy(got[lo : lo + block] >= 0)).float().mean(1))
    searched = index.search(queries, k)[1].numpy()
    rows = index.lookup(queries.codes, queries.vectors)
    return {
        "recall@50" if k == 50 else f"recall@{k}": float(torch.cat(hits).mean()),
        "identical_to_index_search": float(np.mean(np.all(got == searched, axis=1))),
        "query_tokens_unindexed": float(np.mean(
            index.arrays()["code_ids"][rows] != encode_code_ids(queries.codes, index.codebook_size))),
    }


# ------------------------------------------------------------------------------------ driver


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def run_size(n: int, s: Settings, log: Callable[[str], None] = print) -> dict[str, Any]:
    log(f"N = {n:,}")
    set_threads(s.build_threads or os.cpu_count() or 1)
    return measure(build_workload(n, s, log), s, log)


def run_trained(two_tower_dir: Path, sparcode_dir: Path, s: Settings, log: Callable[[str], None] = print) -> dict[str, Any]:
    log(f"trained runs: {two_tower_dir} (two-tower), {sparcode_dir} (SparCode)")
    set_threads(s.build_threads or os.cpu_count() or 1)
    return measure(trained_workload(two_tower_dir, sparcode_dir, s, log), s, log)


def measure(work: Workload, s: Settings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Latency, throughput and agreement of every method of ``work``, on ``s.threads`` threads."""
    methods, info, exact, sparse = work.methods, work.info, work.exact, work.sparse
    set_threads(s.threads)
    log(f"  batch-1 latency: {len(work.latency_users)} queries x {len(methods)} methods (+{s.warmup} warm-up) ...")
    latency = measure_latency(methods, work.latency_users, s.warmup, s.k)
    batches = len(work.batch_users) // s.batch
    if batches < 1:
        raise SystemExit(f"error: {len(work.batch_users)} users left for throughput, fewer than --batch {s.batch}")
    log(f"  throughput: {batches} batches of {s.batch} x {len(methods)} methods ...")
    throughput = measure_throughput(methods, work.batch_users, s.batch, batches, s.k)
    results: dict[str, Any] = {}
    for m in methods:
        lat = latency[m.name]
        served = lat.pop("_served")
        entry: dict[str, Any] = {"family": m.family, **lat, **throughput[m.name],
                                 "index_bytes": int(m.index_bytes), "build_seconds": round(m.build_seconds, 3)}
        if m.family == "two_tower":
            entry[f"recall@{s.k}"] = two_tower_recall(exact, served, s.k)
            entry["recall_reference"] = "ExactInnerProductIndex on the served user vectors"
        else:
            entry.update(sparcode_agreement(sparse, served, s.k))
            entry["recall_reference"] = "SparseCodeIndex.dense_scores (tie-aware)"
        entry.update(m.info)
        results[m.name] = entry
    return {**info, "methods": results, "bar": bar(results)}


def bar(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's bar: SparCode's batch-1 p50 at most faiss IndexFlatIP's (same run)."""
    if "faiss_flat_ip" not in results:
        return {}
    out: dict[str, Any] = {}
    for measure, key in (("end_to_end", "p50_ms"), ("index_only", "index_p50_ms")):
        ref = results["faiss_flat_ip"][key]
        entry: dict[str, Any] = {"faiss_flat_ip_p50_ms": ref}
        if "sparcode_index" in results:
            entry["sparcode_index_p50_ms"] = results["sparcode_index"][key]
            entry["met_by_sparcode_index"] = bool(results["sparcode_index"][key] <= ref)
        out[measure] = entry
    return out


def machine(s: Settings) -> dict[str, Any]:
    """Where the figures were measured: crosstower's environment record (CPU model, torch's CPU
    capability, versions), plus what this benchmark adds: faiss, its thread settings and the commit."""
    return {
        **describe_environment(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "faiss": faiss.__version__,
        "threads": s.threads,
        "build_threads": s.build_threads or os.cpu_count(),
        "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        **source_revision(),
    }


# (heading, width, format) of the printed table; the JSON holds the same numbers unrounded.
COLUMNS = [
    ("method", 18, "{:<18}"), ("p50 ms", 8, "{:>8.3f}"), ("p99 ms", 8, "{:>8.3f}"), ("qps", 9, "{:>9.0f}"),
    ("idx p50", 8, "{:>8.3f}"), ("idx p99", 8, "{:>8.3f}"), ("idx qps", 9, "{:>9.0f}"), ("enc p50", 8, "{:>8.3f}"),
    ("index MB", 9, "{:>9.1f}"), ("build s", 8, "{:>8.2f}"), ("recall", 7, "{:>7.4f}"),
]


def table(result: dict[str, Any], s: Settings) -> str:
    """One line per method; qps columns are at batch ``s.batch``, recall at ``s.k``."""
    lines = [" ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w, _) in enumerate(COLUMNS))]
    for name, r in result["methods"].items():
        values = [name, r["p50_ms"], r["p99_ms"], r[f"qps_batch{s.batch}"], r["index_p50_ms"], r["index_p99_ms"],
                  r[f"index_qps_batch{s.batch}"], r["encoder_p50_ms"], r["index_bytes"] / 2**20,
                  r["build_seconds"], r[f"recall@{s.k}"]]
        lines.append(" ".join(fmt.format(v) for (_, _, fmt), v in zip(COLUMNS, values)))
    title = f"N = {result['num_items']:,}: qps at batch {s.batch}, recall@{s.k}, {s.threads} thread(s)"
    return "\n".join([title, *lines])


def parse(argv: Sequence[str] | None) -> tuple[Settings, Path, list[Path] | None]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Settings()
    p.add_argument("--sizes", type=int, nargs="+", default=d.sizes, help="catalogue sizes N")
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--k", type=int, default=d.k)
    p.add_argument("--user-tokens", type=int, default=d.user_tokens, help="K_u")
    p.add_argument("--num-codebooks", type=int, default=d.num_codebooks, help="M")
    p.add_argument("--codebook-size", type=int, default=d.codebook_size, help="N of each codebook")
    p.add_argument("--codes", type=int, default=d.codes, help="code tuples indexed (the most frequent)")
    p.add_argument("--keep-per-code", type=int, default=d.keep_per_code, help="L; 0: min(1000, N // 100)")
    p.add_argument("--train-users", type=int, default=d.train_users, help="users whose codes are indexed")
    p.add_argument("--queries", type=int, default=d.queries, help="batch-1 queries timed per method")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--batch", type=int, default=d.batch, help="throughput batch size")
    p.add_argument("--batches", type=int, default=d.batches, help="throughput batches timed per method")
    p.add_argument("--threads", type=int, default=d.threads, help="torch and faiss threads while timing")
    p.add_argument("--build-threads", type=int, default=d.build_threads, help="threads for builds (0: all)")
    p.add_argument("--hnsw-m", type=int, default=d.hnsw_m)
    p.add_argument("--ef-construction", type=int, default=d.ef_construction)
    p.add_argument("--ef-search", type=int, default=d.ef_search)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=None, help="subset (default: all)")
    p.add_argument("--runs", type=Path, nargs=2, metavar=("TWO_TOWER_RUN", "SPARCODE_RUN"),
                   help="serve two finished runs on one data set instead of the synthetic workloads "
                        "(--sizes and the workload options are then ignored)")
    p.add_argument("--eager", action="store_true",
                   help="--runs: encode queries in PyTorch instead of the compiled ONNX graph crosstower serve uses")
    p.add_argument("--data-dir", help="--runs: the folder their data set is in, as given to crosstower run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = vars(p.parse_args(argv))
    out, runs = args.pop("out"), args.pop("runs")
    s = Settings(**args)
    if s.k < 1 or s.queries < 1 or s.batch < 1 or s.batches < 1 or s.threads < 1 or min(s.sizes) < 1:
        p.error("k, queries, batch, batches, threads and sizes must be >= 1")
    if min(s.sizes) < s.k:
        p.error(f"every size must be at least k={s.k}")
    return s, out, runs


def main(argv: Sequence[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    s, out, runs = parse(argv)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report: dict[str, Any] = {
        "benchmark": "serving",
        "command": shlex.join(["python", "benchmarks/bench_serving.py", *argv]),
        "started": started,
        "machine": machine(s),
        "settings": asdict(s),
        "results": [],
    }
    workloads = [lambda: run_trained(*runs, s, log)] if runs else [lambda n=n: run_size(n, s, log) for n in s.sizes]
    for workload in workloads:
        result = workload()
        report["results"].append(result)
        log(table(result, s))
        write_json(out, report)  # written after every size: a long run keeps its parts
    log(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
