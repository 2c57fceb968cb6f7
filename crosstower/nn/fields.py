"""Embedding the fields of one side (users or items) into one token per field.

The side's feature table lives in the module as buffers, so a model maps entity indices to
tokens with no data-loader round trip; every model (towers now, token-level scorers later)
builds on these ``[n, F, d]`` tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from crosstower.data.schema import FeatureTable, FieldKind


class FieldEmbedder(nn.Module):
    """Entity index -> ``[n, F, dim]``: one token per field of ``table``."""

    def __init__(self, table: FeatureTable, dim: int):
        super().__init__()
        self.names = list(table.fields)
        self.kinds = {n: table.fields[n].kind for n in self.names}
        self.embeddings = nn.ModuleDict()
        for name, spec in table.fields.items():
            self.register_buffer(f"values_{name}", torch.as_tensor(table.values[name]), persistent=False)
            if spec.kind in (FieldKind.CATEGORICAL, FieldKind.MULTI_CATEGORICAL):
                self.embeddings[name] = nn.Embedding(spec.vocab_size, dim, padding_idx=0)
            elif spec.kind == FieldKind.NUMERIC:
                self.embeddings[name] = nn.Linear(1, dim)
            else:
                self.embeddings[name] = nn.Linear(spec.dim, dim)
        for emb in self.embeddings.values():
            if isinstance(emb, nn.Embedding):
                nn.init.normal_(emb.weight, std=0.05)
                with torch.no_grad():
                    emb.weight[0].zero_()
        # Set only inside `row_values`: field name -> (the rows' index tensor, their values).
        self.row_values: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.applied: set[str] = set()

    @property
    def num_fields(self) -> int:
        return len(self.names)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """Tokens of entities ``index`` (any shape S) -> ``[*S, F, dim]``."""
        flat = index.reshape(-1)
        tokens = [self._embed(name, flat, self._row_values(name, index)) for name in self.names]
        return torch.stack(tokens, dim=1).reshape(*index.shape, len(self.names), -1)

    def _row_values(self, name: str, index: torch.Tensor) -> torch.Tensor | None:
        """The per-row values of field ``name`` when ``index`` is the very tensor they were given
        for (see :func:`row_values`), else None."""
        rows = self.row_values.get(name)
        if rows is None or rows[0] is not index:
            return None
        self.applied.add(name)
        return rows[1]

    def _embed(self, name: str, index: torch.Tensor, row_values: torch.Tensor | None = None) -> torch.Tensor:
        values = getattr(self, f"values_{name}")[index] if row_values is None else row_values
        kind, emb = self.kinds[name], self.embeddings[name]
        if kind == FieldKind.CATEGORICAL:
            return emb(values)
        if kind == FieldKind.MULTI_CATEGORICAL:
            mask = (values > 0).unsqueeze(-1).float()
            return (emb(values) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        if kind == FieldKind.NUMERIC:
            return emb(values.unsqueeze(-1))
        return emb(values)


@contextmanager
def row_values(model: nn.Module, rows: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Within the block, every :class:`FieldEmbedder` of ``model`` that holds field ``name`` and
    is called on the very index tensor ``rows[name][0]`` reads ``rows[name][1]`` (one value per
    index entry) for that field instead of its table's entries.

    This is how a P4 training row reads statistics of its own time (``split.statistics:
    ordered``) while the tables keep the values validation, test and serving read. Matching the
    tensor object, not its shape, means no other call (a history, a deduplicated item set) can
    pick the values up by accident; a model that embeds the rows some other way, so that a field
    it holds is never overridden, raises here instead of training on the table's values.
    """
    embedders = [m for m in model.modules() if isinstance(m, FieldEmbedder)]
    for embedder in embedders:
        embedder.row_values = {name: pair for name, pair in rows.items() if name in embedder.names}
        embedder.applied = set()
    try:
        yield
        held = {name for e in embedders for name in e.row_values}
        applied = set().union(*(e.applied for e in embedders))
        if held - applied:
            raise RuntimeError(
                f"{type(model).__name__}: per-row values of field(s) {sorted(held - applied)} were never read; "
                "the model must embed the rows from the index tensor it was given"
            )
    finally:
        for embedder in embedders:
            embedder.row_values, embedder.applied = {}, set()


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens [B, L, d]`` over positions where ``mask [B, L]``; zeros when empty."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class MLP(nn.Sequential):
    """Linear layers with ReLU (and optional dropout) between them; none after the last."""

    def __init__(self, sizes: list[int], dropout: float = 0.0):
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        super().__init__(*layers)
