"""``crosstower config [SECTION]``: every config key with its default and what it means.

The meaning of a key is written once, as the comment beside (or just above) the field in its
config class; this module reads those comments back from the source (``inspect`` and
``tokenize``), so the help and the code cannot drift apart. A field with a pydantic
``description`` uses that instead.
"""

from __future__ import annotations

import inspect
import io
import json
import tokenize
from typing import Any

from pydantic import BaseModel

from crosstower import config as cfg
from crosstower.errors import ConfigError

SECTIONS = {"dataset": cfg.DatasetConfig, "split": cfg.SplitConfig, "train": cfg.TrainConfig,
            "train.negatives": cfg.NegativesConfig, "evaluate": cfg.EvaluateConfig}


def section_class(name: str) -> type[BaseModel]:
    """The config class of ``name``: a section, a model name, or ``distill.METHOD``."""
    if name in SECTIONS:
        return SECTIONS[name]
    try:
        if name.startswith("distill."):
            return cfg.distill_config_class(name.removeprefix("distill."))
        return cfg.model_config_class(name)
    except ValueError as exc:
        raise ConfigError(f"config {name}: {exc}; sections: {', '.join(SECTIONS)}") from None


def overview() -> str:
    """What ``crosstower config`` prints without a section: the sections, models and methods."""
    from crosstower.data.loaders import LOADERS

    return "\n".join([
        "A run config has the sections dataset, split, model, train, evaluate and (optionally) distill.",
        f"sections:             {', '.join(SECTIONS)}",
        f"models (model.name):  {', '.join(sorted(cfg.model_names()))}",
        f"distill methods:      {', '.join('distill.' + m for m in sorted(cfg.distill_methods()))}",
        f"data sets:            {', '.join(sorted(LOADERS))}",
        "`crosstower config NAME` lists the keys of one, with their defaults and meaning.",
    ])


def describe(name: str) -> str:
    """The keys of section ``name`` as ``key: default  # meaning`` lines (nested blocks indented)."""
    # A class registered under several names (sparcode, alltoall) shows the one asked for.
    chosen = {"name": name} if name not in SECTIONS and not name.startswith("distill.") else {}
    return "\n".join(_lines(section_class(name), "", chosen))


def _lines(model: type[BaseModel], indent: str, chosen: dict[str, Any] | None = None) -> list[str]:
    comments = field_comments(model)
    lines = []
    for key, field in model.model_fields.items():
        meaning = field.description or comments.get(key, "")
        default = (chosen or {}).get(key, field.get_default(call_default_factory=True))
        if isinstance(default, BaseModel):
            lines.append(f"{indent}{key}:{'  # ' + meaning if meaning else ''}")
            lines += _lines(type(default), indent + "  ")
            continue
        shown = json.dumps(_plain(default))  # blocks (BaseModel defaults) were listed above
        lines.append(f"{indent}{key}: {shown}{'  # ' + meaning if meaning else ''}")
    return lines


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "value"):  # an enum
        return value.value
    return value


def field_comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the comment on its line, or else the comment lines just above it, gathered
    over the class and its config base classes (the nearest definition wins)."""
    comments: dict[str, str] = {}
    for klass in reversed(model.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, BaseModel)) or klass is BaseModel:
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        comments.update(_comments_of(inspect.cleandoc("\n" + source) if source.startswith(" ") else source,
                                     set(klass.__annotations__)))
    return comments


def _comments_of(source: str, fields: set[str]) -> dict[str, str]:
    by_line: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            by_line[token.start[0]] = token.string.lstrip("#").strip()
    out = {}
    for number, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0].strip()
        if name not in fields or ":" not in stripped or stripped.startswith("#"):
            continue
        if number in by_line and not stripped.startswith("#"):
            out[name] = by_line[number]
            continue
        above, previous = [], number - 1
        while previous in by_line and source.splitlines()[previous - 1].strip().startswith("#"):
            above.insert(0, by_line[previous])
            previous -= 1
        if above:
            out[name] = " ".join(above)
    return out
