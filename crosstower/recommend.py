"""Recommendations from a finished run, in the data set's own ids.

``crosstower.load_run(DIR)`` opens a run as a :class:`Retriever`. :meth:`Retriever.recommend`
turns raw user ids, or the raw item histories of users the run has never seen, into each one's
top items through the run's own serving index (the faiss or exact inner-product index of the
embedding models and distilled students, SparCode's sparse code index, late interaction's token
index), or by scoring every item where the model has no index. So what a user is recommended is
what ``crosstower run`` measured as "served". The CLI's ``recommend``, the HTTP service and the
tests all answer through this module.

A known user's history is every interaction the data set holds for them, oldest first (the
model reads its last ``train.history_length``); ``exclude_seen`` removes those items from the
answer. A history request reads no user features: each user field takes its "missing" value
(id 0 of a categorical field, the mean of a standardised numeric one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crosstower.data.batching import UserInput
from crosstower.data.dataset import ITEM, TIME, USER
from crosstower.data.ragged import Ragged
from crosstower.errors import CrosstowerError
from crosstower.evaluate.ranking import topk_items
from crosstower.index import Index
from crosstower.models.base import ENCODE_BLOCK
from crosstower.nn.fields import row_values
from crosstower.query_graph import CompiledQueries, compiled_queries
from crosstower.run_dir import Run, open_run
from crosstower.tables import text_table

RawId = str | int


class RequestError(CrosstowerError):
    """A recommendation request names an unknown id or asks for an impossible ``k``."""


class UnknownIdError(RequestError):
    """A request names a user or item id that the run's data set does not hold."""


@dataclass(frozen=True)
class Recommendation:
    """One answer: the best items first, with the model's scores (higher is better)."""

    user: RawId | None  # the user's id; None for a history request
    items: list[RawId]  # item ids, as the data set spells them
    scores: list[float]

    def as_dict(self) -> dict[str, Any]:
        return {"user_id": self.user, "items": self.items, "scores": self.scores}


class Retriever:
    """A finished run that answers top-k requests in raw ids (see the module docstring)."""

    def __init__(self, run: Run, mmap: bool = True) -> None:
        if run.split.protocol == "p4":
            raise CrosstowerError(f"{run.folder.path}: a P4 (pre-ranking) run scores given pairs only; "
                                  f"recommend from a retrieval run (protocol p1, p2 or p3)")
        self.run = run
        self.model = run.model.cpu().eval()
        dataset = run.dataset
        # The data set's own ids (Python ints or strings), and each one's index by its text.
        self._user_ids = np.asarray([_plain(raw) for raw in dataset.user_ids], dtype=object)
        self._item_ids = np.asarray([_plain(raw) for raw in dataset.item_ids], dtype=object)
        self._user_index = {_key(raw): i for i, raw in enumerate(self._user_ids)}
        self._item_index = {_key(raw): i for i, raw in enumerate(self._item_ids)}
        self.seen = _histories(run)
        self.index: Index | None = run.index(mmap=mmap)
        self.compiled: CompiledQueries | None = None  # see compile()

    def compile(self) -> bool:
        """Answer known users' queries through the query side's ONNX graph in onnxruntime, on
        torch's current thread count (:mod:`crosstower.query_graph`: the same answers for a
        fraction of eager PyTorch's fixed cost per call, which is most of a batch-1 query).
        False where the run has no index or its model no query graph: PyTorch answers then."""
        if self.index is not None and self.compiled is None:
            self.compiled = compiled_queries(self.model, self.seen.padded_tail(self._length)[:2],
                                             torch.get_num_threads())
        return self.compiled is not None

    # ---------------------------------------------------------------------------- description

    @property
    def num_items(self) -> int:
        return len(self._item_ids)

    @property
    def served_by(self) -> str:
        """How answers are computed: the index kind and whether it is exact, or exhaustive scoring."""
        if self.index is None:
            return "exhaustive scoring of every item"
        exactness = "exact" if self.index.exact else "approximate"
        return f"{self.index.kind} index ({exactness})"

    def describe(self) -> dict[str, Any]:
        """The run in a few fields: what ``GET /info`` and ``crosstower recommend`` show."""
        run = self.run
        return {
            "run": str(run.folder.path),
            "model": run.config.model.name,
            "dataset": run.dataset.name,
            "protocol": run.split.protocol,
            "users": len(self._user_ids),
            "items": self.num_items,
            "served_by": self.served_by,
            "queries_by": "onnxruntime" if self.compiled is not None else "pytorch",
            "index": run.metrics.get("index", {}),
            "metrics": run.metrics.get("metrics", {}),
        }

    def item_details(self, items: Sequence[RawId]) -> list[dict[str, Any]]:
        """What the data set says about each item (its title or name, its categorical fields as
        the files spell them), for showing recommendations; numeric fields, standardised when
        read, are left out."""
        dataset = self.run.dataset
        rows = self._indices(items, self._item_index, "item")
        shown = {name: spec for name, spec in dataset.items.fields.items() if spec.vocabulary}
        details = []
        for row in rows:
            info: dict[str, Any] = {}
            if dataset.item_names is not None and dataset.item_names[row] is not None:
                info["title"] = dataset.item_names[row]
            for name, spec in shown.items():
                ids = np.atleast_1d(dataset.items.values[name][row])
                info[name] = ", ".join(str(spec.vocabulary[i - 1]) for i in ids if i > 0)
            details.append(info)
        return details

    # ---------------------------------------------------------------------------- answers

    def recommend(
        self, users: Sequence[RawId] | None = None, histories: Sequence[Sequence[RawId]] | None = None,
        k: int = 10, exclude_seen: bool = True,
    ) -> list[Recommendation]:
        """The top ``k`` items of each user in ``users`` (raw ids) or of each history in
        ``histories`` (raw item ids, oldest first); exactly one of the two. Fewer than ``k``
        items come back only where ``exclude_seen`` leaves fewer."""
        if (users is None) == (histories is None):
            raise RequestError("give either users or histories")
        self._check_k(k)
        if users is not None:
            indices = self._indices(users, self._user_index, "user")
            seen = self.seen.take(indices)
            user = UserInput(torch.from_numpy(indices), torch.from_numpy(seen.padded_tail(self._length)),
                             torch.zeros(len(indices)))
            top = self._top(user, seen if exclude_seen else None, k)
            return [Recommendation(self._user_ids[i], *answer) for i, answer in zip(indices, top)]
        rows = [self._indices(history, self._item_index, "item") for history in histories]
        seen = Ragged(np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64),
                      np.concatenate(rows + [np.zeros(0, dtype=np.int64)]))
        user = UserInput(torch.zeros(len(rows), dtype=torch.int64),
                         torch.from_numpy(seen.padded_tail(self._length)), torch.zeros(len(rows)))
        top = self._top(user, seen if exclude_seen else None, k, anonymous=True)
        return [Recommendation(None, *answer) for answer in top]

    @property
    def _length(self) -> int:
        return self.run.config.train.history_length

    def _check_k(self, k: Any) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise RequestError(f"k: expected a whole number >= 1, got {k!r}")
        if k > self.num_items:
            raise RequestError(f"k: {k} is above the catalogue's {self.num_items} items")

    def _indices(self, raw_ids: Sequence[RawId], lookup: dict[str, int], side: str) -> np.ndarray:
        if isinstance(raw_ids, (str, bytes)) or not isinstance(raw_ids, Sequence):
            raise RequestError(f"expected a list of {side} ids, got {raw_ids!r}")
        keys = [_key(raw) for raw in raw_ids]
        unknown = [raw for raw, key in zip(raw_ids, keys) if key is None or key not in lookup]
        if unknown:
            shown = ", ".join(repr(raw) for raw in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise UnknownIdError(f"unknown {side} id{'s' if len(unknown) > 1 else ''}: {shown} "
                               f"(not in the run's data set {self.run.dataset.name})")
        return np.asarray([lookup[key] for key in keys], dtype=np.int64)

    @torch.no_grad()
    def _top(self, user: UserInput, exclude: Ragged | None, k: int,
             anonymous: bool = False) -> list[tuple[list[RawId], list[float]]]:
        """Top ``k`` (raw ids, scores) per row of ``user``: the index's search, or exact
        exhaustive top-k where the model has no index. ``anonymous`` rows read no user fields."""
        if exclude is None:
            exclude = Ragged(np.zeros(len(user) + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))
        if self.index is None:
            item_scorer = self.model.item_scorer()

            def scorer(rows: np.ndarray, lo: int, hi: int) -> torch.Tensor:
                block = user.rows(rows)
                with self._user_fields(block, anonymous):
                    return item_scorer(block, lo, hi)

            scores, items = topk_items(scorer, len(user), self.num_items, exclude, k)
        else:
            parts = []
            for lo in range(0, len(user), ENCODE_BLOCK):
                rows = np.arange(lo, min(lo + ENCODE_BLOCK, len(user)))
                block = user.rows(rows)
                if self.compiled is not None and not anonymous:  # the graph holds the user feature tables
                    query = self.compiled(block)
                else:
                    with self._user_fields(block, anonymous):
                        query = self.model.index_query(block)
                parts.append(self.index.search(query, k, exclude.take(rows)))
            scores, items = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        answers = []
        for row_scores, row_items in zip(scores.numpy(), items.numpy()):
            # Excluded items come back last, scored -inf, where fewer than k others remain.
            keep = (row_items >= 0) & (row_scores > float("-inf"))
            answers.append((list(self._item_ids[row_items[keep]]), row_scores[keep].tolist()))
        return answers

    def _user_fields(self, block: UserInput, anonymous: bool) -> contextlib.AbstractContextManager:
        """Within the block, ``anonymous`` rows read every user field's "missing" value."""
        if not anonymous:
            return contextlib.nullcontext()
        table = self.run.dataset.users
        missing = {name: (block.users, torch.zeros((len(block), *table.values[name].shape[1:]),
                                                   dtype=torch.as_tensor(table.values[name][:0]).dtype))
                   for name in table.fields}
        return row_values(self.model, missing)


def format_recommendation(retriever: Retriever, answer: Recommendation) -> str:
    """An answer as a terminal table: rank, item, score and what the data set says of the item."""
    details = retriever.item_details(answer.items)
    columns = list(dict.fromkeys(key for info in details for key in info))
    rows = [[rank, item, f"{score:.4f}", *(_clip(info.get(c, "")) for c in columns)]
            for rank, (item, score, info) in enumerate(zip(answer.items, answer.scores, details), start=1)]
    return text_table(["rank", "item", "score", *columns], rows)


def _clip(text: object, width: int = 48) -> str:
    text = str(text)
    return text if len(text) <= width else text[: width - 3] + "..."


def load_run(run_dir: Path | str, data_dir: Path | None = None, mmap: bool = True) -> Retriever:
    """Open the finished run ``run_dir`` (with its data set from ``data_dir``, default
    ``../shared/data``) as a :class:`Retriever`."""
    return Retriever(open_run(run_dir, data_dir), mmap=mmap)


def _plain(raw: Any) -> Any:
    return raw.item() if isinstance(raw, np.generic) else raw


def _key(raw: Any) -> str | None:
    """The id as the text a request compares (JSON strings and whole numbers alike); None for
    anything else (floats, lists), which no id matches."""
    raw = _plain(raw)
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        return None
    return str(raw)


def _histories(run: Run) -> Ragged:
    """Every user's known items, oldest first (ties in item order), from the run's data set."""
    inter = run.dataset.interactions
    order = np.lexsort((inter[ITEM].to_numpy(), inter[TIME].to_numpy(), inter[USER].to_numpy()))
    return Ragged.from_groups(inter[USER].to_numpy()[order], inter[ITEM].to_numpy()[order], run.dataset.num_users)
