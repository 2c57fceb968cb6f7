"""Typed experiment configuration: YAML in, validated pydantic models out.

Every key is declared with its type and default; an unknown key or a wrong type is reported as
one line naming the dotted key (``train.lr: Input should be a valid number``) and raised as a
:class:`~crosstower.errors.ConfigError`, which the CLI turns into exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from crosstower.errors import ConfigError, first_error_line

# The most codes ``model.index_codes: all`` enumerates (2^26 = 8,192^2, about 406^3): a
# product quantiser's id space grows as N^M, and beyond this its code table alone takes gigabytes.
MAX_ENUMERATED_CODES = 2**26


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetConfig(Strict):
    name: str = "synthetic"  # a loader: synthetic, ml-100k, ml-latest-small, s3rec, generic, ...
    path: str | None = None  # folder relative to --data-dir (or absolute); None: the loader's default
    options: dict[str, Any] = Field(default_factory=dict)  # validated by the loader


class SplitConfig(Strict):
    protocol: Literal["p1", "p2", "p3", "p4"] = "p2"
    seed: int = 0
    # P4 only: a row rated >= positive_min is a positive, <= negative_max a negative, anything in
    # between is dropped. Filled with 4 and 2 under p4 (IntTower's MovieLens labels); null otherwise.
    positive_min: float | None = None
    negative_max: float | None = None
    # P4 only: which labelled rows a row's user and item rating statistics come from.
    # "ordered" (filled under p4): a training row reads its entities' training rows before its
    # time, a validation or test row all their training rows. "entity": every row reads all the
    # entities' training rows, a training row's own rating included (a target leak in training,
    # kept to reproduce the earlier tables). "all_labels": every row reads all the entities'
    # labelled rows, validation and test included, so held-out rows read their own labels: the
    # leak of IntTower's released Amazon script; "in_split": each part's rows read statistics of
    # that part's own labelled rows, the leak of its MovieLens script (reference 2.5). Those two
    # measure what the leak is worth, never a result. See crosstower/data/features.py.
    statistics: Literal["ordered", "entity", "all_labels", "in_split"] | None = None
    # P4 only: "temporal" (filled under p4): each user's labelled rows split by time like P1;
    # "random": all labelled rows drawn 70/10/20 by ``seed``, as IntTower's released scripts
    # split (a row's history and statistics still read only training rows before its time).
    order: Literal["temporal", "random"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _p4_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("protocol") == "p4":
            defaults = {"positive_min": 4.0, "negative_max": 2.0, "statistics": "ordered", "order": "temporal"}
            data = {**data, **{k: v for k, v in defaults.items() if data.get(k) is None}}
        return data

    @model_validator(mode="after")
    def _thresholds_only_for_p4(self):
        if self.protocol != "p4":
            for key in ("positive_min", "negative_max", "statistics", "order"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} is used by protocol p4 only (protocol is {self.protocol}); remove it")
        elif self.negative_max >= self.positive_min:
            raise ValueError(f"negative_max {self.negative_max:g} must be below positive_min {self.positive_min:g}")
        return self


POINTWISE_METRICS = ("auc", "gauc", "logloss")  # P4's metrics; logloss: lower is better


class NegativesConfig(Strict):
    sampler: Literal["uniform", "popularity", "none"] = "uniform"
    num: int = Field(100, ge=0)
    alpha: float = 0.75  # popularity sampler exponent
    in_batch: bool = False  # also use the batch's other positives as negatives
    logq: bool = True  # subtract log expected count (no effect for uniform-only sampling)


class TrainConfig(Strict):
    epochs: int = Field(30, ge=0)
    batch_size: int = Field(512, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    patience: int = Field(3, ge=1)  # epochs without validation improvement before stopping
    # Multiply the learning rate by lr_decay once more than lr_patience epochs in a row have not
    # improved the validation metric (torch's ReduceLROnPlateau); 1.0 keeps the rate constant.
    # (On the synthetic default it did not lift late interaction's plateau: docs/results.md.)
    lr_decay: float = Field(1.0, gt=0, le=1)
    lr_patience: int = Field(0, ge=0)
    # Validate, select and save an exponential moving average of the weights, updated after every
    # step with this decay (0 = off; 0.999 averages over about the last 1,000 steps). Training
    # itself steps the live weights; see crosstower/train/averaging.py for why.
    ema_decay: float = Field(0.0, ge=0, lt=1)
    seed: int = 0
    threads: int = Field(2, ge=1)
    history_length: int = Field(50, ge=0)
    negatives: NegativesConfig = Field(default_factory=NegativesConfig)
    # Stop (keeping the best epoch) after this much training; a model's warm-up epochs (SparCode's
    # unquantised ones) are always followed by one selectable epoch, so a run never ends without one.
    max_minutes: float | None = None
    # bf16: training steps run under bfloat16 autocast (1.6x faster cross-encoder steps on CPUs
    # with AMX/AVX512-BF16); validation and test scoring always run in float32, so rankings are
    # exact and comparable across precisions.
    precision: Literal["fp32", "bf16"] = "fp32"
    # Where training steps and validation run: "cpu", or "cuda" / "cuda:N" where a GPU exists.
    # Batches are built on the CPU either way; test scoring runs here too, the index is built
    # and the model saved on the CPU, so a run trained on a GPU serves and loads anywhere.
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")

    @model_validator(mode="after")
    def _decay_before_stop(self):
        if self.lr_decay < 1 and self.patience <= self.lr_patience + 1:
            raise ValueError(
                f"patience {self.patience} stops the run before the learning rate can fall "
                f"(after {self.lr_patience + 1} epochs without improvement); raise patience above "
                f"lr_patience + 1 or set lr_decay 1"
            )
        return self


class EvaluateConfig(Strict):
    ks: list[int] = Field(default_factory=lambda: [20, 50])
    user_batch: int = Field(256, ge=1)
    item_chunk: int = Field(65536, ge=1)
    early_stopping_metric: str = "recall@50"


class PopularityConfig(Strict):
    name: Literal["popularity"]


RANKING_METRICS = ("recall", "ndcg", "precision", "hitrate", "mrr")


class _TwoTowerFields(Strict):
    embedding_dim: int = Field(64, ge=1)
    output_dim: int = Field(64, ge=1)
    user_hidden: list[int] = Field(default_factory=lambda: [128])
    item_hidden: list[int] = Field(default_factory=lambda: [128])
    user_fields: list[str] | None = None
    item_fields: list[str] | None = None
    use_history: bool = True
    learn_temperature: bool = False
    item_bias: bool = False
    dropout: float = Field(0.0, ge=0, lt=1)


    @model_validator(mode="after")
    def _item_side_fits(self):
        if not self.item_mlp and self.embedding_dim != self.output_dim:
            raise ValueError("item_mlp false needs embedding_dim == output_dim (the item vector is its embedding)")
        return self


class DSSMConfig(_TwoTowerFields):
    name: Literal["dssm"]
    item_mlp: bool = True
    use_example_age: bool = False
    similarity: Literal["cosine", "dot"] = "cosine"
    temperature: float = Field(0.05, gt=0)


class YouTubeDNNConfig(_TwoTowerFields):
    name: Literal["youtubednn"]
    item_mlp: bool = False
    item_hidden: list[int] = Field(default_factory=list)
    use_example_age: bool = True
    similarity: Literal["cosine", "dot"] = "dot"
    temperature: float = Field(1.0, gt=0)


class IndexBudget(Strict):
    """A sparse code index's size budget, shared among the codes by use (``UsageBudget``)."""

    share: float = Field(gt=0, le=1)
    usage_exponent: float = Field(0.5, ge=0)


class _TokenizerFields(Strict):
    """What the tokenizer-based models (SparCode, all-to-all, tokenizer two-tower) share."""

    # "dnn", "sa" or (SparCode and all-to-all only) "late": late interaction's user tower, one
    # normalised ``projection_dim`` vector per user field, history item and expansion token.
    tokenizer: Literal["dnn", "sa", "late"] = "dnn"
    dim: int = Field(64, ge=1)
    user_fields: list[str] | None = None
    item_fields: list[str] | None = None
    tokenizer_hidden: list[int] = Field(default_factory=lambda: [256])
    item_hidden: list[int] = Field(default_factory=lambda: [128])
    sa_layers: int = Field(2, ge=1)
    sa_heads: int = Field(2, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    # A learned per-item prior added to every score. SparCode serves it as a dense vector beside
    # the posting lists, so popularity need not fill every code's posting list; the two-tower
    # model serves it as one more item-vector dimension (against a constant 1 on the user side).
    item_bias: bool = False


class TokenTwoTowerConfig(_TokenizerFields):
    """A two-tower model over SparCode's tokenizers: one user token, one item token, a dot product."""

    name: Literal["twotower"]

    @model_validator(mode="after")
    def _one_token_tokenizer(self):
        if self.tokenizer == "late":
            raise ValueError("tokenizer 'late' emits one vector per user token; its two-tower model is "
                             "late interaction itself (model name 'colbert')")
        return self


class SparCodeConfig(_TokenizerFields):
    """SparCode; ``name: alltoall`` is the same model unquantised (the exhaustive upper bound)."""

    name: Literal["sparcode", "alltoall"]
    # "maxsim": E(token, item) = max over the item's tokens of their inner product with the
    # token, / maxsim_temperature (late interaction's per-token term; no parameters).
    interaction: Literal["mlp", "sa", "maxsim"] = "mlp"
    maxsim_temperature: float = Field(1.0, gt=0)
    # The "late" tokenizer's towers: the substrate and encoders are ``dim`` wide, every token
    # vector (what is quantised and what MaxSim reads) ``projection_dim``; the item tower has
    # ``item_layers`` layers, the user tower ``sa_layers``, and ``expansion_tokens`` learned
    # user tokens join each user.
    projection_dim: int = Field(32, ge=1)
    item_layers: int = Field(1, ge=1)
    expansion_tokens: int = Field(0, ge=0)
    user_tokens: int = Field(4, ge=1)
    # "summary": K_u tokens that each summarise the user (the tokenizer's heads or query
    # tokens); "history": one token per item of the last K_u history items, read in the user's
    # context (users with a shorter history have fewer tokens).
    user_tokens_from: Literal["summary", "history"] = "summary"
    item_tokens: int = Field(4, ge=1)
    interaction_hidden: list[int] = Field(default_factory=lambda: [128, 64], min_length=1)
    # MLP encoder only: add a factorised bilinear term (A token) * (B item) to its first layer.
    interaction_products: bool = False
    # "product": each codebook snaps its own dim / num_codebooks slice of a token; "residual":
    # each codebook snaps the whole token's residual after the codebooks before it.
    quantizer: Literal["product", "residual"] = "product"
    num_codebooks: int = Field(2, ge=1)
    codebook_size: int = Field(256, ge=2)
    commitment: float = Field(0.25, ge=0)
    vq_weight: float = Field(1.0, ge=0)
    # Epochs trained unquantised before the codebooks are set by k-means on the learned tokens
    # (of ``kmeans_examples`` training examples) and quantisation starts; 0 quantises from the
    # first batch. Warm-up epochs are never selected as the best epoch.
    vq_warmup_epochs: int = Field(0, ge=0)
    kmeans_examples: int = Field(8192, ge=1)
    # A codebook entry whose EMA count (sub-vectors assigned per batch) falls below this is moved
    # onto a random token of the batch. 0.1 restarts an entry a few hundred steps after its last
    # win; the quantiser's own default (1e-3) waits about 700 steps at decay 0.99, longer than an
    # epoch of the synthetic default.
    vq_dead_threshold: float = Field(0.1, ge=0)
    # With train.ema_decay, average the codebooks with the weights (from the first quantised
    # step), so the validated and indexed model's codes match its averaged towers. Off, the
    # averaged towers meet the live codebooks (as the runs before this key measured).
    average_codebooks: bool = False
    sparsity_bias: float = 0.0
    # Weight of the L1 penalty on sampled negatives' per-token scores (0: none), applied once
    # quantisation is on; larger weights leave fewer non-zero (code, item) scores to index.
    sparsity_weight: float = Field(0.0, ge=0)
    # Training steps over which that weight grows from 0, quadratically, once quantisation is on
    # (0: full weight at once). At full weight from the first quantised step, L1 1.0 drove a
    # second seed's scores below 0 for good (positive share 0.03, validation at popularity level).
    sparsity_ramp_steps: int = Field(0, ge=0)
    # Which (code, item) scores the index keeps: "nonzero", the top-L per code (an int), the
    # scores above a threshold (a float >= 0), or {share, usage_exponent}: about that share of
    # the table, each code's top entries in proportion to its use (index.sparse_code.UsageBudget).
    index_keep: Union[Literal["nonzero"], int, float, IndexBudget] = "nonzero"
    # Which codes get a posting list: "observed", those the training users' tokens take (a test
    # user's unseen code falls back to the nearest of them), or "all" N^M tuples (none falls back;
    # at most 2^26 codes). The build scores code chunks in ``index_workers`` processes.
    index_codes: Literal["observed", "all"] = "observed"
    index_workers: int = Field(1, ge=1)

    @property
    def token_dim(self) -> int:
        """The size of a user token vector: what the quantiser snaps."""
        return self.projection_dim if self.tokenizer == "late" else self.dim

    @model_validator(mode="after")
    def _codebooks_divide_dim(self):
        if self.name == "sparcode" and self.quantizer == "product" and self.token_dim % self.num_codebooks:
            what = "projection_dim" if self.tokenizer == "late" else "dim"
            raise ValueError(f"{what} {self.token_dim} is not divisible by num_codebooks {self.num_codebooks}")
        return self

    @model_validator(mode="after")
    def _late_tokens_are_fixed(self):
        """The late tokenizer's token counts are the substrate's: one per user field, history
        slot and expansion token, one per item field."""
        fixed = [name for name in ("user_tokens", "user_tokens_from", "item_tokens")
                 if getattr(self, name) != type(self).model_fields[name].default]  # a saved run writes defaults
        if self.tokenizer == "late" and fixed:
            raise ValueError(f"tokenizer 'late' takes its token counts from the substrate; drop {fixed}")
        return self

    @model_validator(mode="after")
    def _enumerable_codes(self):
        """Refused when the config is read, not after training, when the index is built."""
        codes = self.codebook_size**self.num_codebooks
        if self.index_codes == "all" and codes > MAX_ENUMERATED_CODES:
            raise ValueError(f"index_codes 'all' would enumerate codebook_size^num_codebooks = {codes:,} codes, "
                             f"more than {MAX_ENUMERATED_CODES:,}; use 'observed'")
        return self

    @model_validator(mode="after")
    def _late_needs_an_encoder_for_any_item_token_count(self):
        """The MLP encoder reads a fixed number of item tokens; the late tokenizer's item token
        count follows the item fields, so it is refused here, when the config is read, rather
        than when the model is built."""
        if self.tokenizer == "late" and self.interaction == "mlp":
            raise ValueError("tokenizer 'late' needs interaction 'maxsim' or 'sa' (the MLP encoder reads a "
                             "fixed number of item tokens)")
        return self


class MVKEConfig(Strict):
    """MVKE: K virtual kernels attend over the user fields, one expert per kernel, item-gated.

    One ``dim`` serves the field tokens, the kernels and both towers' outputs: the item gate
    dots the item vector with the raw kernels, so the two must have the same size.
    """

    name: Literal["mvke"]
    kernels: int = Field(3, ge=1)
    dim: int = Field(64, ge=1)
    expert_hidden: list[int] = Field(default_factory=lambda: [128])
    item_hidden: list[int] = Field(default_factory=lambda: [128])
    user_fields: list[str] | None = None
    item_fields: list[str] | None = None
    dropout: float = Field(0.0, ge=0, lt=1)


class InttowerConfig(Strict):
    """IntTower: Light-SE field re-weighting, BatchNorm MLP towers, FE-Block MaxSim over heads.

    ``user_hidden`` sets the number of user FE layers (one head per layer, on its input) and the
    widths before the last; ``item_hidden`` the item tower, whose last output feeds the item
    head. Heads default to 4 x 64 (the MindSpore port's FE size) rather than the ML-1M script's
    32 x 64: a pair costs ``len(user_hidden) * heads_user * heads_item * head_dim`` multiply-adds,
    64x fewer, which keeps listwise training with tens to hundreds of negatives affordable on CPU.
    ``cir_weight`` 0 turns CIR off (as the released code at HEAD).
    """

    name: Literal["inttower"]
    embedding_dim: int = Field(32, ge=1)
    user_hidden: list[int] = Field(default_factory=lambda: [300, 300, 128], min_length=1)
    item_hidden: list[int] = Field(default_factory=lambda: [300, 300, 128], min_length=1)
    heads_user: int = Field(4, ge=1)
    heads_item: int = Field(4, ge=1)
    head_dim: int = Field(64, ge=1)
    light_se: bool = True
    user_fields: list[str] | None = None
    item_fields: list[str] | None = None
    dropout: float = Field(0.3, ge=0, lt=1)
    cir_weight: float = Field(0.0, ge=0)
    cir_temperature: float = Field(0.07, gt=0)
    item_bias: bool = False  # a learned per-item prior beside the FE score (the towers' item bias)


class AttentionBlocksConfig(Strict):
    """Which attention blocks of the cross encoder are on: query side then key side."""

    uu: bool = True  # user tokens attend to user tokens
    ui: bool = True  # user tokens attend to item tokens
    iu: bool = True  # item tokens attend to user tokens
    ii: bool = True  # item tokens attend to item tokens


class CrossConfig(Strict):
    """The all-to-all cross encoder: one transformer over [user tokens; item tokens]."""

    name: Literal["cross"]
    dim: int = Field(64, ge=1)
    layers: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    user_fields: list[str] | None = None
    item_fields: list[str] | None = None
    blocks: AttentionBlocksConfig = Field(default_factory=AttentionBlocksConfig)
    dropout: float = Field(0.0, ge=0, lt=1)
    pair_chunk: int = Field(4096, ge=1)  # pairs per transformer call in exhaustive scoring

    @model_validator(mode="after")
    def _heads_divide_dim(self):
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        return self


class LateInteractionIndexConfig(Strict):
    """How the late-interaction index serves: faiss candidates, then exact MaxSim re-scoring."""

    # A faiss index_factory string; {auto} = 4 sqrt(tokens) lists (at most tokens / 39).
    candidate_index: str = "IVF{auto},Flat"
    # Defaults from benchmarks/late_interaction_index.py on the synthetic default: 99.4% of
    # exhaustive Recall@50 while scoring 10% of the 3,000 items (64 tokens a query: 94.4%).
    tokens_per_query: int = Field(128, ge=1)  # item tokens each user token retrieves
    max_candidates: int = Field(300, ge=1)  # items re-scored exactly per user
    nprobe: int = Field(16, ge=1)  # IVF lists searched per user token
    store: Literal["float16", "residual"] = "float16"  # residual: ColBERTv2 centroid + nbits residual
    nbits: Literal[1, 2, 4, 8] = 4  # residual bits per dimension (store: residual)


class LateInteractionConfig(Strict):
    """ColBERT-style late interaction (MaxSim) on the substrate's two token towers."""

    name: Literal["colbert"]
    dim: int = Field(64, ge=1)
    projection_dim: int = Field(32, ge=1)
    user_layers: int = Field(2, ge=1)
    item_layers: int = Field(1, ge=1)
    heads: int = Field(2, ge=1)
    user_fields: list[str] | None = None
    item_fields: list[str] | None = None
    expansion_tokens: int = Field(0, ge=0)
    item_cls: bool = False
    temperature: float = Field(1.0, gt=0)
    item_bias: bool = False  # a learned per-item term added to MaxSim
    index: LateInteractionIndexConfig = Field(default_factory=LateInteractionIndexConfig)
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide_dim(self):
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        return self


ModelConfig = Annotated[
    Union[PopularityConfig, DSSMConfig, YouTubeDNNConfig, TokenTwoTowerConfig, SparCodeConfig, MVKEConfig, CrossConfig,
          LateInteractionConfig, InttowerConfig],
    Field(discriminator="name"),
]


MODEL_NAMES = ("popularity", "dssm", "youtubednn", "twotower", "sparcode", "alltoall", "mvke", "cross", "colbert",
               "inttower")


class RunConfig(Strict):
    name: str | None = None
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="before")
    @classmethod
    def _p4_stops_on_auc_by_default(cls, data: Any) -> Any:
        """Under p4 an unset ``evaluate.early_stopping_metric`` is ``auc`` (not ``recall@50``)."""
        if not isinstance(data, dict):
            return data
        split = data.get("split")
        protocol = split.get("protocol") if isinstance(split, dict) else getattr(split, "protocol", None)
        evaluate = data.get("evaluate", {})
        if protocol == "p4" and isinstance(evaluate, dict) and "early_stopping_metric" not in evaluate:
            data = {**data, "evaluate": {**evaluate, "early_stopping_metric": "auc"}}
        return data

    @model_validator(mode="after")
    def _consistent(self):
        ks = self.evaluate.ks
        if not ks or min(ks) < 1 or len(set(ks)) != len(ks):
            raise ValueError(f"evaluate.ks: expected distinct positive cut-offs, got {ks}")
        pointwise = self.split.protocol == "p4"
        metric, _, k = self.evaluate.early_stopping_metric.partition("@")
        if pointwise and self.evaluate.early_stopping_metric not in POINTWISE_METRICS:
            raise ValueError(
                f"evaluate.early_stopping_metric: protocol p4 (pre-ranking) stops on one of {'|'.join(POINTWISE_METRICS)}, "
                f"got '{self.evaluate.early_stopping_metric}'"
            )
        if not pointwise and (metric not in RANKING_METRICS or not k.isdigit() or int(k) not in ks):
            hint = " (auc, gauc and logloss are protocol p4's)" if metric in POINTWISE_METRICS else ""
            raise ValueError(
                f"evaluate.early_stopping_metric: expected <{'|'.join(RANKING_METRICS)}>@K with K in evaluate.ks {ks}, "
                f"got '{self.evaluate.early_stopping_metric}'{hint}"
            )
        negatives = self.train.negatives
        has_negatives = negatives.in_batch or (negatives.sampler != "none" and negatives.num > 0)
        # Under p4 the labels give the negatives: the sampled ones are not used.
        if self.model.name != "popularity" and not pointwise and not has_negatives:
            raise ValueError("train.negatives: no negatives (set num > 0 with a sampler, or in_batch: true)")
        if getattr(self.model, "user_tokens_from", "summary") == "history" and self.model.user_tokens > self.train.history_length:
            raise ValueError(
                f"model.user_tokens: {self.model.user_tokens} history tokens need train.history_length >= "
                f"{self.model.user_tokens}, got {self.train.history_length}"
            )
        warmup = getattr(self.model, "vq_warmup_epochs", 0)
        if self.model.name == "sparcode" and warmup >= self.train.epochs:
            raise ValueError(f"model.vq_warmup_epochs: {warmup} leaves no quantised epoch in train.epochs {self.train.epochs}")
        return self

    @property
    def run_name(self) -> str:
        return self.name or f"{self.dataset.name}-{self.model.name}-{self.split.protocol}"


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings; values are parsed as YAML (``3``, ``true``, ``[1, 2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def parse_config(raw: Any, source: str = "config", overrides: list[str] | None = None) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    raw = apply_overrides(raw, overrides or [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {first_error_line(exc, skip=MODEL_NAMES)}") from None


def load_config(path: Path, overrides: list[str] | None = None) -> RunConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    return parse_config(raw, str(path), overrides)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
