"""The embedded default data set: synthetic interactions with a planted three-way interaction.

Why synthetic: the library claims that interaction-rich scorers beat a single dot product of two
separate towers. That claim needs a data set where we *know* the structure a dot product struggles
with. Here the relevance of item ``i`` (cluster ``c``, style ``s``) for user ``u`` is
``1[c in interests(u)] * L[segment(u), c, s]``: a conjunction of a latent user property (the
interest clusters, visible only through the history), a user field (the segment) and two item
fields (cluster and style). ``docs/synthetic.md`` explains the process and why it separates the
model families; this module implements exactly that process.

Generation is vectorised over chunks of ``chunk_users`` users. The static tables (items, segment
tables, the taste table) come from one seeded stream and chunk ``c`` from its own stream keyed by
``c``, so the same config gives the same data whether it is generated in memory
(:func:`generate`) or streamed to disk (:func:`write`), and a streamed run never holds more than
one chunk of interactions.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from crosstower.data.dataset import Dataset, FieldSpec, build_dataset
from crosstower.data.schema import FieldKind
from crosstower.errors import DataError
from crosstower.files import replace_dir

NAME = "synthetic"
NUM_AGE_BUCKETS = 7
AGE_SIGNAL = 0.5  # share of users whose age bucket is their segment's; the rest are uniform
BRANDS_PER_CLUSTER = 4
PRICE_NOISE = 0.3  # log-normal noise around the style's base price
TIME_START = 1_577_836_800  # 2020-01-01 UTC: users start uniformly in one year from here
TIME_WINDOW = 365 * 86_400
MEAN_GAP = 86_400  # one day between a user's consecutive interactions, on average
_STATIC, _CHUNK_USERS, _CHUNK_INTERACTIONS = 0, 1, 2  # spawn keys of the independent streams

USER_SPECS = [FieldSpec(n, FieldKind.CATEGORICAL) for n in ("segment", "age_bucket", "region")]
ITEM_SPECS = [FieldSpec(n, FieldKind.CATEGORICAL) for n in ("cluster", "style", "brand")] + [
    FieldSpec("price", FieldKind.NUMERIC)
]


class SyntheticConfig(BaseModel):
    """Sizes and knobs of the generator; the defaults are the embedded default data set.

    The defaults (6,000 users, 3,000 items, about 170k interactions) let a two-tower model train
    in about a minute on two CPU cores while keeping the planted structure rich enough (40
    clusters x 10 styles x 32 segments) that a 64-dimensional dot product cannot hold it exactly.
    ``chunk_users`` is the unit of deterministic generation: changing it changes the data.
    """

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0)
    num_users: int = Field(6_000, ge=1)
    num_items: int = Field(3_000, ge=1)
    num_clusters: int = Field(40, ge=1)
    num_styles: int = Field(10, ge=1)
    num_segments: int = Field(32, ge=1)
    num_regions: int = Field(8, ge=1)
    popularity_exponent: float = Field(0.9, ge=0.0)
    cluster_exponent: float = Field(0.5, ge=0.0)
    segment_exponent: float = Field(0.8, ge=0.0)
    interests_mean: float = Field(2.5, ge=1.0)
    interests_max: int = Field(5, ge=1)
    liked_style_density: float = Field(0.3, gt=0.0, le=1.0)
    interest_mode_probability: float = Field(0.8, ge=0.0, le=1.0)
    interactions_median: float = Field(35.0, gt=0.0)
    interactions_sigma: float = Field(0.8, ge=0.0)
    interactions_min: int = Field(5, ge=1)
    interactions_max: int = Field(300, ge=1)
    chunk_users: int = Field(50_000, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> "SyntheticConfig":
        """Reject combinations the process cannot honour, naming the offending option."""
        if self.num_items < self.num_clusters:
            raise ValueError(f"num_items ({self.num_items}) must be >= num_clusters ({self.num_clusters})")
        if self.interests_max > self.num_clusters:
            raise ValueError(f"interests_max ({self.interests_max}) must be <= num_clusters ({self.num_clusters})")
        if self.interests_mean > self.interests_max:
            raise ValueError(f"interests_mean ({self.interests_mean}) must be <= interests_max ({self.interests_max})")
        if self.interactions_min > self.interactions_max:
            raise ValueError(
                f"interactions_min ({self.interactions_min}) must be <= interactions_max ({self.interactions_max})"
            )
        return self

    @property
    def num_chunks(self) -> int:
        return -(-self.num_users // self.chunk_users)


def parse_options(options: dict) -> SyntheticConfig:
    """Validate user options; the first problem becomes one ``DataError`` line naming the option."""
    from crosstower.data.loaders.files import parse_options as parse_loader_options

    return parse_loader_options(SyntheticConfig, options)


# --------------------------------------------------------------------------------------------
# Static tables: items, segment tables and the taste table, drawn once from the static stream.


@dataclass(frozen=True)
class _BucketSampler:
    """Weighted draws inside many buckets with one ``searchsorted`` call.

    Items are sorted by bucket and ``cum = bucket + within-bucket normalised cumulative weight``
    (the last item of a bucket sits exactly at ``bucket + 1``). For ``u ~ U[0, 1)`` the first
    entry above ``bucket + u`` lies inside that bucket and is hit with probability proportional
    to its weight, so any mixture of buckets is drawn in one vectorised call.
    """

    order: np.ndarray  # item ids sorted by bucket
    cum: np.ndarray  # float64, bucket + cumulative share
    sizes: np.ndarray  # items per bucket

    @classmethod
    def build(cls, bucket: np.ndarray, weight: np.ndarray, num_buckets: int) -> "_BucketSampler":
        order = np.argsort(bucket, kind="stable")
        b, w = bucket[order], weight[order]
        sizes = np.bincount(b, minlength=num_buckets)
        totals = np.bincount(b, weights=w, minlength=num_buckets)
        before = np.concatenate([[0.0], np.cumsum(totals)])[b]
        within = np.minimum((np.cumsum(w) - before) / totals[b], 1.0)
        ends = np.cumsum(sizes)[sizes > 0] - 1
        within[ends] = 1.0
        return cls(order, b + within, sizes)

    def draw(self, bucket: np.ndarray, u: np.ndarray) -> np.ndarray:
        """One item per row from ``bucket`` (which must be non-empty), using uniforms ``u``."""
        return self.order[np.searchsorted(self.cum, bucket + u, side="right")]


@dataclass(frozen=True)
class _Tables:
    """Everything that does not depend on the users: the catalogue and the latent tables."""

    items: pd.DataFrame  # item_id, cluster, style, brand, price (raw values)
    popularity: np.ndarray  # w_i = rank^-alpha
    cluster_p: np.ndarray  # [K] cluster distribution (items and interests)
    segment_p: np.ndarray  # [G]
    segment_age: np.ndarray  # [G] the age bucket a segment's users mostly have
    taste: np.ndarray  # bool [G, K, S]: segment g likes style s within cluster c
    liked_count: np.ndarray  # [G, K]
    liked_styles: np.ndarray  # [G, K, S]: the k-th liked style of (g, c) at position k
    by_style: _BucketSampler  # buckets c * S + s
    by_cluster: _BucketSampler  # buckets c
    overall: _BucketSampler  # one bucket


def _power_law(n: int, exponent: float) -> np.ndarray:
    """Probabilities proportional to ``rank^-exponent`` for ranks 1..n in id order."""
    p = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return p / p.sum()


def _static_rng(cfg: SyntheticConfig) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(_STATIC,)))


def _draw_items(rng: np.random.Generator, cfg: SyntheticConfig, cluster_p: np.ndarray) -> pd.DataFrame:
    """Cluster (skewed, every cluster non-empty), style (uniform), brand and price."""
    n, k, s = cfg.num_items, cfg.num_clusters, cfg.num_styles
    cluster = rng.choice(k, size=n, p=cluster_p)
    cluster[rng.permutation(n)[:k]] = np.arange(k)  # an interest cluster must have items
    style = rng.integers(s, size=n)
    brand = cluster * BRANDS_PER_CLUSTER + rng.integers(BRANDS_PER_CLUSTER, size=n)
    base_price = np.exp(rng.uniform(np.log(5.0), np.log(200.0), size=s))
    price = np.round(base_price[style] * np.exp(PRICE_NOISE * rng.standard_normal(n)), 2)
    return pd.DataFrame(
        {"item_id": np.arange(n, dtype=np.int64), "cluster": cluster, "style": style, "brand": brand, "price": price}
    )


def _draw_taste(rng: np.random.Generator, cfg: SyntheticConfig) -> np.ndarray:
    """``L[g, c, s] ~ Bernoulli(density)``, with at least one liked style per (g, c)."""
    g, k, s = cfg.num_segments, cfg.num_clusters, cfg.num_styles
    taste = rng.random((g, k, s)) < cfg.liked_style_density
    fill = rng.integers(s, size=(g, k))
    empty_g, empty_c = np.nonzero(~taste.any(axis=-1))
    taste[empty_g, empty_c, fill[empty_g, empty_c]] = True
    return taste


def _static_tables(cfg: SyntheticConfig) -> _Tables:
    rng = _static_rng(cfg)
    cluster_p = _power_law(cfg.num_clusters, cfg.cluster_exponent)
    items = _draw_items(rng, cfg, cluster_p)
    popularity = (rng.permutation(cfg.num_items) + 1.0) ** -cfg.popularity_exponent
    segment_age = rng.integers(NUM_AGE_BUCKETS, size=cfg.num_segments)
    taste = _draw_taste(rng, cfg)
    cluster, style = items["cluster"].to_numpy(), items["style"].to_numpy()
    k, s = cfg.num_clusters, cfg.num_styles
    return _Tables(
        items=items,
        popularity=popularity,
        cluster_p=cluster_p,
        segment_p=_power_law(cfg.num_segments, cfg.segment_exponent),
        segment_age=segment_age,
        taste=taste,
        liked_count=taste.sum(axis=-1),
        liked_styles=np.argsort(~taste, axis=-1, kind="stable"),  # liked styles first, in order
        by_style=_BucketSampler.build(cluster * s + style, popularity, k * s),
        by_cluster=_BucketSampler.build(cluster, popularity, k),
        overall=_BucketSampler.build(np.zeros(cfg.num_items, dtype=np.int64), popularity, 1),
    )


# --------------------------------------------------------------------------------------------
# One chunk of users and their interactions.


@dataclass(frozen=True)
class _Users:
    """Users of one chunk: observed fields, latent interests and how many interactions to draw."""

    user_id: np.ndarray
    segment: np.ndarray
    age_bucket: np.ndarray
    region: np.ndarray
    interests: np.ndarray  # [n, interests_max], -1 padded
    num_interests: np.ndarray
    num_interactions: np.ndarray

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {"user_id": self.user_id, "segment": self.segment, "age_bucket": self.age_bucket, "region": self.region}
        )


def _chunk_rng(cfg: SyntheticConfig, stream: int, chunk: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(stream, chunk)))


def _chunk_bounds(cfg: SyntheticConfig, chunk: int) -> tuple[int, int]:
    start = chunk * cfg.chunk_users
    return start, min(cfg.num_users, start + cfg.chunk_users)


def _draw_users(cfg: SyntheticConfig, tables: _Tables, chunk: int) -> _Users:
    """Users of ``chunk``, from their own stream so they can be redrawn without interactions."""
    rng = _chunk_rng(cfg, _CHUNK_USERS, chunk)
    start, stop = _chunk_bounds(cfg, chunk)
    n, m_max = stop - start, cfg.interests_max
    segment = rng.choice(cfg.num_segments, size=n, p=tables.segment_p)
    noisy_age = rng.integers(NUM_AGE_BUCKETS, size=n)
    age = np.where(rng.random(n) < AGE_SIGNAL, tables.segment_age[segment], noisy_age)
    region = rng.integers(cfg.num_regions, size=n)
    num_interests = np.clip(1 + rng.poisson(cfg.interests_mean - 1.0, size=n), 1, m_max)
    # Gumbel top-k: the first m of these are m clusters drawn without replacement from cluster_p.
    keys = np.log(tables.cluster_p) + rng.gumbel(size=(n, cfg.num_clusters))
    ranked = np.argsort(-keys, axis=1)[:, :m_max]
    interests = np.where(np.arange(m_max) < num_interests[:, None], ranked, -1)
    raw = rng.lognormal(np.log(cfg.interactions_median), cfg.interactions_sigma, size=n)
    counts = np.clip(np.rint(raw), cfg.interactions_min, cfg.interactions_max).astype(np.int64)
    return _Users(
        np.arange(start, stop, dtype=np.int64), segment, age, region, interests, num_interests, counts
    )


def _draw_items_for(
    rng: np.random.Generator, cfg: SyntheticConfig, tables: _Tables, users: _Users, row_user: np.ndarray
) -> np.ndarray:
    """One item per interaction row: interest mode (cluster, liked style, popularity) or global."""
    t = len(row_user)
    interest_mode = rng.random(t) < cfg.interest_mode_probability
    slot = (rng.random(t) * users.num_interests[row_user]).astype(np.int64)
    u_style, u_item = rng.random(t), rng.random(t)
    item = np.empty(t, dtype=np.int64)
    rows = np.nonzero(interest_mode)[0]
    cluster = users.interests[row_user[rows], slot[rows]]
    segment = users.segment[row_user[rows]]
    k = (u_style[rows] * tables.liked_count[segment, cluster]).astype(np.int64)
    bucket = cluster * cfg.num_styles + tables.liked_styles[segment, cluster, k]
    filled = tables.by_style.sizes[bucket] > 0
    item[rows[filled]] = tables.by_style.draw(bucket[filled], u_item[rows[filled]])
    item[rows[~filled]] = tables.by_cluster.draw(cluster[~filled], u_item[rows[~filled]])
    rest = np.nonzero(~interest_mode)[0]
    item[rest] = tables.overall.draw(np.zeros(len(rest), dtype=np.int64), u_item[rest])
    return item


def _draw_times(rng: np.random.Generator, counts: np.ndarray) -> np.ndarray:
    """Start uniformly in the window, then exponential gaps (at least one second) per user."""
    start = TIME_START + (rng.random(len(counts)) * TIME_WINDOW).astype(np.int64)
    gaps = 1 + np.floor(rng.exponential(MEAN_GAP, size=int(counts.sum()))).astype(np.int64)
    total = np.cumsum(gaps)
    before = np.concatenate([[0], total])[np.cumsum(counts) - counts]
    return np.repeat(start - before, counts) + total


def _draw_interactions(cfg: SyntheticConfig, tables: _Tables, users: _Users, chunk: int) -> pd.DataFrame:
    """Interactions of one chunk in time order per user; repeated (user, item) pairs keep the first."""
    rng = _chunk_rng(cfg, _CHUNK_INTERACTIONS, chunk)
    row_user = np.repeat(np.arange(len(users.user_id)), users.num_interactions)
    frame = pd.DataFrame(
        {
            "user_id": users.user_id[row_user],
            "item_id": _draw_items_for(rng, cfg, tables, users, row_user),
            "timestamp": _draw_times(rng, users.num_interactions),
        }
    )
    return frame.drop_duplicates(["user_id", "item_id"], keep="first").reset_index(drop=True)


def _chunks(cfg: SyntheticConfig, tables: _Tables, progress: bool) -> Iterator[tuple[_Users, pd.DataFrame]]:
    for chunk in tqdm(range(cfg.num_chunks), desc=NAME, unit="chunk", disable=not progress):
        users = _draw_users(cfg, tables, chunk)
        yield users, _draw_interactions(cfg, tables, users, chunk)


# --------------------------------------------------------------------------------------------
# Public API.


def generate(config: SyntheticConfig | None = None, progress: bool = False) -> Dataset:
    """The data set of ``config`` in memory, with its latent ground truth in ``metadata``."""
    cfg = config or SyntheticConfig()
    tables = _static_tables(cfg)
    users, parts = zip(*_chunks(cfg, tables, progress))
    user_frame = pd.concat([u.frame() for u in users], ignore_index=True)
    dataset = _build(pd.concat(parts, ignore_index=True), user_frame, tables.items)
    dataset.metadata[NAME] = _ground_truth(cfg, tables, list(users), dataset)
    return dataset


def write(config: SyntheticConfig, out_dir: Path | str, progress: bool = True, overwrite: bool = False) -> Path:
    """Stream the data set to ``out_dir`` chunk by chunk; only one chunk is ever in memory.

    Layout: ``config.json``, ``items.parquet``, ``users.parquet`` (one row group per chunk) and
    ``interactions/part-NNNNN.parquet`` (one file per chunk). Everything is written to a hidden
    directory beside ``out_dir`` and renamed at the end, so a crash never leaves half a data set.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_into(config, tmp, progress)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_synthetic(path: Path | str | None = None, **options) -> Dataset:
    """Read a directory written by :func:`write`, or generate in memory from ``options``.

    With ``path``, any ``options`` given must agree with the directory's ``config.json`` (so a
    config cannot silently describe a different data set than the one read).
    """
    cfg = parse_options(options)
    if path is None:
        return generate(cfg)
    root = Path(path)
    if not (root / "config.json").is_file():
        raise DataError(f"{root}: not a synthetic data set directory (no config.json; create one with write())")
    stored = _stored_config(root / "config.json")
    clash = [k for k in options if getattr(stored, k) != getattr(cfg, k)]
    if clash:
        name = clash[0]
        stored_value = getattr(stored, name)
        raise DataError(f"dataset.options.{name}: {options[name]!r} differs from {stored_value!r} in {root / 'config.json'}")
    return _read(stored, root)


def _stored_config(path: Path) -> SyntheticConfig:
    """The config a directory was written with; a damaged file is named in the error."""
    try:
        return parse_options(json.loads(path.read_text()))
    except (OSError, ValueError, DataError) as exc:
        raise DataError(f"{path}: not a valid synthetic config ({exc})") from None


def planted_relevance(dataset: Dataset, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """``1[c_i in interests(u)] * L[g_u, c_i, s_i]`` as a bool ``[len(users), len(items)]`` matrix.

    ``users`` and ``items`` are dataset indices. This is the planted relevance, without
    popularity and without the random (non-interest) interactions: the best any model can know.
    """
    truth = dataset.metadata[NAME]
    users, items = np.asarray(users), np.asarray(items)
    cluster, style = truth["item_cluster"][items], truth["item_style"][items]
    member = (truth["interests"][users][:, :, None] == cluster[None, None, :]).any(axis=1)
    liked = truth["taste"][truth["segment"][users][:, None], cluster[None, :], style[None, :]]
    return member & liked


# --------------------------------------------------------------------------------------------
# Helpers of the public API.


def _build(interactions: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame) -> Dataset:
    return build_dataset(
        NAME,
        interactions,
        user_features=users.set_index("user_id"),
        user_specs=USER_SPECS,
        item_features=items.set_index("item_id"),
        item_specs=ITEM_SPECS,
        source=NAME,
    )


def _ground_truth(cfg: SyntheticConfig, tables: _Tables, users: list[_Users], dataset: Dataset) -> dict:
    """Latent variables aligned with the dataset's indices: small, and enough to explain results."""
    interests = np.concatenate([u.interests for u in users])[dataset.user_ids].astype(np.int16)
    segment = np.concatenate([u.segment for u in users])[dataset.user_ids].astype(np.int16)
    items = tables.items.iloc[dataset.item_ids]
    return {
        "config": cfg.model_dump(),
        "interests": interests,
        "segment": segment,
        "item_cluster": items["cluster"].to_numpy(np.int16),
        "item_style": items["style"].to_numpy(np.int16),
        "taste": tables.taste,
        "taste_shape": tables.taste.shape,
    }


def _write_into(cfg: SyntheticConfig, root: Path, progress: bool) -> None:
    (root / "interactions").mkdir(parents=True)
    tables = _static_tables(cfg)
    pq.write_table(pa.Table.from_pandas(tables.items, preserve_index=False), root / "items.parquet")
    writer: pq.ParquetWriter | None = None
    try:
        for chunk, (users, part) in enumerate(_chunks(cfg, tables, progress)):
            user_table = pa.Table.from_pandas(users.frame(), preserve_index=False)
            writer = writer or pq.ParquetWriter(root / "users.parquet", user_table.schema)
            writer.write_table(user_table)
            part_path = root / "interactions" / f"part-{chunk:05d}.parquet"
            pq.write_table(pa.Table.from_pandas(part, preserve_index=False), part_path)
    finally:
        if writer is not None:
            writer.close()
    (root / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2) + "\n")


def _read(cfg: SyntheticConfig, root: Path) -> Dataset:
    try:
        parts = sorted((root / "interactions").glob("part-*.parquet"))
        if len(parts) != cfg.num_chunks:
            raise DataError(f"{root}/interactions: expected {cfg.num_chunks} part files, found {len(parts)}")
        interactions = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
        users = pd.read_parquet(root / "users.parquet")
        items = pd.read_parquet(root / "items.parquet")
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{root}: unreadable synthetic data set ({exc})") from None
    dataset = _build(interactions, users, items)
    tables = _static_tables(cfg)
    latent = [_draw_users(cfg, tables, c) for c in range(cfg.num_chunks)]
    dataset.metadata[NAME] = _ground_truth(cfg, tables, latent, dataset)
    return dataset
