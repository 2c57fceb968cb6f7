"""Typed experiment configuration: YAML in, validated pydantic models out.

Every key is declared with its type and default; an unknown key or a wrong type is reported as
one line naming the dotted key (``train.lr: Input should be a valid number``) and raised as a
:class:`~crosstower.errors.ConfigError`, which the CLI turns into exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from crosstower.errors import ConfigError, first_error_line

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetConfig(Strict):
    name: str = "synthetic"  # a loader: synthetic, ml-100k, ml-latest-small, s3rec, generic, ...
    path: str | None = None  # folder relative to --data-dir (or absolute); None: the loader's default
    options: dict[str, Any] = Field(default_factory=dict)  # validated by the loader


class SplitConfig(Strict):
    # p1: each user's latest interactions held out by time; p2: held-out users (their first 80% is history);
    # p3: held-out users with no history (cold start); p4: pre-ranking, rows labelled by rating.
    protocol: Literal["p1", "p2", "p3", "p4"] = "p2"
    seed: int = 0  # seeds the p2/p3 user shuffle and p4's random row split (order: random); p1 ignores it
    # P4 only: a row rated >= positive_min is a positive, <= negative_max a negative, anything in
    # between is dropped. Filled with 4 and 2 under p4 (IntTower's MovieLens labels); null otherwise.
    positive_min: float | None = None
    negative_max: float | None = None  # P4 only: a row rated <= negative_max is a negative (2 under p4)
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
    sampler: Literal["uniform", "popularity", "none"] = "uniform"  # uniform over items, count^alpha, or none
    num: int = Field(100, ge=0)  # negatives drawn per training example (0: none sampled)
    alpha: float = 0.75  # popularity sampler exponent
    in_batch: bool = False  # also use the batch's other positives as negatives
    logq: bool = True  # subtract log expected count (no effect for uniform-only sampling)


class TrainConfig(Strict):
    epochs: int = Field(30, ge=0)  # epochs at most (early stopping may end sooner)
    # Training examples per epoch (null: all of them, one pass). Smaller, an epoch is the next
    # slice of a stream of passes, each pass its own shuffle, so every example still comes once a
    # pass; validation, checkpoints, patience and warm-up count these shorter epochs (for data
    # sets whose full pass is longer than the time budget, such as a million items).
    examples_per_epoch: int | None = Field(None, ge=1)
    batch_size: int = Field(512, ge=1)  # training examples per optimiser step
    lr: float = Field(1e-3, gt=0)  # Adam's learning rate
    weight_decay: float = Field(0.0, ge=0)  # Adam's L2 weight decay (0: none)
    patience: int = Field(3, ge=1)  # epochs without validation improvement before stopping
    # Multiply the learning rate by lr_decay once more than lr_patience epochs in a row have not
    # improved the validation metric (torch's ReduceLROnPlateau); 1.0 keeps the rate constant.
    # (On the synthetic default it did not lift late interaction's plateau: docs/results.md.)
    lr_decay: float = Field(1.0, gt=0, le=1)
    lr_patience: int = Field(0, ge=0)  # epochs without improvement tolerated before each lr_decay step
    # Validate, select and save an exponential moving average of the weights, updated after every
    # step with this decay (0 = off; 0.999 averages over about the last 1,000 steps). Training
    # itself steps the live weights; see crosstower/train/averaging.py for why.
    ema_decay: float = Field(0.0, ge=0, lt=1)
    seed: int = 0  # seeds the initial weights, example order, negative sampling and dropout
    threads: int = Field(2, ge=1)  # torch CPU threads for training and evaluation (and serving, by default)
    history_length: int = Field(50, ge=0)  # most recent training items a user's input holds (0: no history)
    negatives: NegativesConfig = Field(default_factory=NegativesConfig)  # listwise training's negatives (not p4's)
    # Stop (keeping the best epoch) after this much training, checked between batches: the epoch
    # that crosses it ends early and is validated like any other. A model's warm-up epochs
    # (SparCode's unquantised ones) are never cut and are always followed by one selectable
    # epoch, so a run never ends without one.
    max_minutes: float | None = None
    # bf16: training steps run under bfloat16 autocast (1.6x faster cross-encoder steps on CPUs
    # with AMX/AVX512-BF16, but 8x slower on a CPU without bfloat16 instructions, AVX2 only,
    # where a run warns);
    # validation and test scoring always run in float32, so rankings are exact and comparable
    # across precisions.
    precision: Literal["fp32", "bf16"] = "fp32"
    # How an inner-product model scores a batch's candidates: "gather" each row's item vectors, or
    # "auto": one [batch, distinct items] matrix product when the batch has few distinct items
    # (2.1x faster DSSM steps on MovieLens-100K with 200 negatives; the float rounding differs,
    # so a run moves within its seed spread: ML-100K P1 DSSM test Recall@50 0.3891 -> 0.3859).
    candidate_scoring: Literal["gather", "auto"] = "gather"
    # Embedding tables get sparse gradients and a lazy Adam (torch's SparseAdam: a row moves only
    # at the steps whose batch uses it; no weight decay), the other parameters Adam: a step costs
    # the rows a batch touches, not the whole table (a million-row table made dense Adam's update
    # most of a step). Not the same optimisation as Adam, so off by default; one process only.
    sparse_embeddings: bool = False
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
    ks: list[int] = Field(default_factory=lambda: [20, 50])  # ranking cut-offs K: every metric is reported @K
    user_batch: int = Field(256, ge=1)  # users ranked per call in full-ranking evaluation (memory; metrics unchanged)
    item_chunk: int = Field(65536, ge=1)  # items scored per call in full-ranking evaluation (memory; metrics unchanged)
    # Validation metric that selects the best epoch (and drives patience and lr_decay):
    # <recall|ndcg|precision|hitrate|mrr>@K with K in ks; under p4 auc (its default), gauc or logloss.
    early_stopping_metric: str = "recall@50"
    # Rank for at most this many validation and test users, a sample drawn with split.seed and
    # saved with the run (null: all): for models whose full ranking is too slow to repeat every
    # epoch on a CPU, such as a cross encoder trained as a teacher. A sample's metrics are noisier.
    max_users: int | None = Field(None, ge=1)


RANKING_METRICS = ("recall", "ndcg", "precision", "hitrate", "mrr")

# model name -> its configuration class, filled as each model module defines its class
_MODEL_CONFIGS: dict[str, type[ModelConfig]] = {}
# distillation method -> its configuration class, filled as each method module defines its class
_DISTILL_CONFIGS: dict[str, type[DistillConfig]] = {}


def _register(cls: type, field: str, registry: dict[str, type]) -> None:
    """Register ``cls`` under every name its ``field: Literal[...]`` allows."""
    annotation = cls.model_fields[field].annotation
    if get_origin(annotation) is Literal:
        for name in get_args(annotation):
            registry[name] = cls


class ModelConfig(Strict):
    """Base of every model's configuration.

    A subclass lives in its model's module and registers itself, when it is defined, under the
    names its ``name: Literal[...]`` field allows: a config file's ``model.name`` finds it with no
    list to edit. It builds its model (:meth:`build`), checks what must agree with the rest of
    the run (:meth:`check_run`) and reads configs written by earlier versions (:meth:`upgrade`).
    """

    name: str  # the model to build (a name listed by `crosstower config`)
    trains: ClassVar[bool] = True  # False: nothing to train (popularity), so no negatives are needed

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        _register(cls, "name", _MODEL_CONFIGS)

    @classmethod
    def upgrade(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """``raw`` (a ``model`` section) in today's keys: where keys have moved, an old config or
        run folder still loads. Unchanged by default."""
        return raw

    def check_run(self, run: RunConfig) -> None:
        """Raise ValueError where this model's settings disagree with the rest of ``run``."""

    def build(self, dataset: Any, context: Any) -> Any:
        """The untrained model for ``dataset`` under ``context`` (a
        :class:`~crosstower.models.base.BuildContext`)."""
        raise NotImplementedError


def model_names() -> list[str]:
    """Every registered model name (importing the model modules registers them)."""
    _discover_models()
    return sorted(_MODEL_CONFIGS)


def model_config_class(name: Any) -> type[ModelConfig]:
    """The configuration class registered under ``name``; ValueError names the valid ones."""
    _discover_models()
    if name not in _MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(_MODEL_CONFIGS))}")
    return _MODEL_CONFIGS[name]


def _discover_models() -> None:
    import crosstower.models  # noqa: F401  (imports every model module, which registers its config)


class TeacherConfig(Strict):
    """Where a distillation teacher comes from: a finished run folder (``run``), or a config
    (``config``, with ``overrides`` as ``--set`` gives them) that is trained first, beside the
    student's run, and reused while its config and data are unchanged."""

    run: str | None = None  # a finished run folder to load the teacher from (give run or config, not both)
    config: str | None = None  # a run config file to train the teacher from first (reused while unchanged)
    overrides: list[str] = Field(default_factory=list)  # key=value overrides of that config, as --set gives them

    @model_validator(mode="after")
    def _one_source(self):
        if (self.run is None) == (self.config is None):
            raise ValueError("expected exactly one of 'run' (a finished run folder) or 'config' (a config to train)")
        if self.overrides and self.config is None:
            raise ValueError("overrides apply to a teacher named by 'config', not to a finished 'run'")
        return self


class DistillConfig(Strict):
    """Base of every distillation method's configuration (the ``distill`` section).

    The run's ``model`` is the student; the method says how it learns from the teacher. Its
    objective is a set of named terms, ``terms: {name: weight}`` (a weight of 0 switches a term
    off and skips computing it), filled from the method's defaults (:attr:`TERMS`), so an
    ablation is a config change. Like :class:`ModelConfig`, a subclass lives in its method's
    module and registers under its ``method: Literal[...]`` names.
    """

    method: str  # the distillation method (a distill.* name from `crosstower config`)
    # The frozen teacher: {run: FOLDER} or {config: FILE, overrides: [...]}; null: none (pfd trains its own).
    teacher: TeacherConfig | None = None
    # Named loss weights {term: weight}: terms left out keep the method's defaults (TERMS); 0 turns one off.
    terms: dict[str, float] = Field(default_factory=dict)
    TERMS: ClassVar[dict[str, float]] = {}  # every term of the method and its default weight
    TEACHER_TERMS: ClassVar[tuple[str, ...]] = ()  # the terms that read a frozen teacher
    POINTWISE: ClassVar[bool] = False  # has a form on labelled rows (pre-ranking, protocol p4)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        _register(cls, "method", _DISTILL_CONFIGS)

    @model_validator(mode="before")
    @classmethod
    def _default_terms(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        given = data.get("terms") or {}
        if not isinstance(given, dict):
            raise ValueError(f"terms: expected a mapping of term name to weight ({', '.join(cls.TERMS)})")
        unknown = sorted(set(given) - set(cls.TERMS))
        if unknown:
            raise ValueError(f"terms: unknown term {unknown[0]!r}; {data.get('method')} has {', '.join(cls.TERMS)}")
        return {**data, "terms": {**cls.TERMS, **given}}

    @model_validator(mode="after")
    def _teacher_when_needed(self):
        reading = [t for t in self.TEACHER_TERMS if self.terms.get(t, 0) != 0]
        if reading and self.teacher is None:
            raise ValueError(f"teacher: the terms {', '.join(reading)} read a teacher; give teacher.run (a finished "
                             f"run folder) or teacher.config (a config to train first)")
        if any(w < 0 for w in self.terms.values()):
            raise ValueError("terms: weights must be >= 0")
        if not any(self.terms.values()):
            raise ValueError("terms: every weight is 0; nothing to train")
        return self

    def uses(self, term: str) -> bool:
        """Whether ``term`` is on (its weight is not 0)."""
        return self.terms.get(term, 0) != 0

    def check_run(self, run: RunConfig) -> None:
        """Raise ValueError where the method's settings disagree with the rest of ``run``."""

    def check_student(self, student: Any, model_name: str) -> None:
        """Raise ConfigError where ``student`` cannot learn by this method: here, anything but
        an inner-product model (the students served like DSSM)."""
        from crosstower.models.base import EmbeddingRecommender

        if not isinstance(student, EmbeddingRecommender):
            raise ConfigError(f"model: a {self.method} student is an inner-product model (served like DSSM); "
                              f"{model_name} is not one")
        if student.own_loss:
            raise ConfigError(f"model: {model_name} trains by its own objective, which a distillation method "
                              f"cannot add terms to; choose another student")

    def build(self, student: Any, teacher: Any, context: Any) -> Any:
        """The :class:`~crosstower.distill.distiller.Distiller` that trains ``student`` with
        ``teacher`` (None where no term reads one) in ``context`` (a
        :class:`~crosstower.distill.distiller.DistillContext`)."""
        raise NotImplementedError


def distill_methods() -> list[str]:
    """Every registered distillation method (importing the method modules registers them)."""
    import crosstower.distill  # noqa: F401

    return sorted(_DISTILL_CONFIGS)


def distill_config_class(method: Any) -> type[DistillConfig]:
    """The configuration class registered under ``method``; ValueError names the valid ones."""
    if method not in _DISTILL_CONFIGS and method not in distill_methods():
        raise ValueError(f"unknown distillation method {method!r}; valid methods: {', '.join(distill_methods())}")
    return _DISTILL_CONFIGS[method]


class RunConfig(Strict):
    name: str | None = None  # the run's name (default folder runs/NAME); None: DATASET-MODEL-PROTOCOL
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)  # the data set to load
    split: SplitConfig = Field(default_factory=SplitConfig)  # how it is split into train, validation and test
    model: SerializeAsAny[ModelConfig]  # the model, chosen by model.name
    train: TrainConfig = Field(default_factory=TrainConfig)  # how the model is trained
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)  # how validation and test rank
    # Train ``model`` as the student of a teacher (crosstower/distill/); None: train it alone.
    distill: SerializeAsAny[DistillConfig] | None = None

    @field_validator("distill", mode="wrap")
    @classmethod
    def _registered_method(cls, value: Any, handler: Any) -> DistillConfig | None:
        """The ``distill`` section validated by the class registered under its ``method``."""
        if value is None or isinstance(value, DistillConfig):
            return value
        if not isinstance(value, dict) or "method" not in value:
            raise ValueError(f"expected a mapping with a 'method' (one of {', '.join(distill_methods())})")
        return distill_config_class(value["method"]).model_validate(value)

    @field_validator("model", mode="wrap")
    @classmethod
    def _registered_model(cls, value: Any, handler: Any) -> ModelConfig:
        """The ``model`` section validated by the class registered under its ``name``."""
        if isinstance(value, ModelConfig):
            return value
        if not isinstance(value, dict) or "name" not in value:
            raise ValueError(f"expected a mapping with a 'name' (one of {', '.join(model_names())})")
        config_class = model_config_class(value["name"])
        return config_class.model_validate(config_class.upgrade(dict(value)))

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
        if pointwise and self.evaluate.max_users is not None:
            raise ValueError("evaluate.max_users: protocol p4 scores every labelled row; the option is for ranking")
        negatives = self.train.negatives
        has_negatives = negatives.in_batch or (negatives.sampler != "none" and negatives.num > 0)
        # Under p4 the labels give the negatives: the sampled ones are not used.
        if self.model.trains and not pointwise and not has_negatives:
            raise ValueError("train.negatives: no negatives (set num > 0 with a sampler, or in_batch: true)")
        self.model.check_run(self)
        if self.distill is not None:
            if pointwise and not self.distill.POINTWISE:
                able = ", ".join(m for m in distill_methods() if distill_config_class(m).POINTWISE)
                raise ValueError(f"distill: {self.distill.method} distils over sampled candidates; under protocol p4 "
                                 f"(labelled rows) use {able}")
            self.distill.check_run(self)
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
        parsed = yaml.safe_load(value)
        section = node.get(parts[-1])
        if isinstance(section, dict) and section and not isinstance(parsed, dict):
            # Replacing a whole section by a scalar would silently drop every key in it.
            raise ConfigError(f"--set {item}: '{key.strip()}' is a section ({', '.join(section)}); set one of its keys, "
                              f"e.g. --set {key.strip()}.{next(iter(section))}=...")
        node[parts[-1]] = parsed
    return raw


def parse_config(raw: Any, source: str = "config", overrides: list[str] | None = None) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    raw = apply_overrides(raw, overrides or [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {first_error_line(exc)}") from None


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
