"""Transformer block and tokenizers: shapes, padding never matters, attention is exposed."""

import numpy as np
import pytest
import torch

from crosstower.data.batching import UserInput
from crosstower.nn.fields import FieldEmbedder
from crosstower.nn.tokenizers import DNNTokenizer, ItemTokenizer, SATokenizer
from crosstower.nn.transformer import TransformerEncoder
from tests.helpers import random_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fields():
    ds = random_dataset()
    torch.manual_seed(0)
    return FieldEmbedder(ds.users, 8), FieldEmbedder(ds.items, 8), ds


def user_input(history_rows):
    history = torch.tensor(history_rows)
    return UserInput(torch.arange(len(history_rows)), history)


def test_attention_is_exposed_and_ignores_padding():
    torch.manual_seed(0)
    encoder = TransformerEncoder(dim=8, layers=2, heads=2).eval()
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out, traces = encoder(x, mask, return_traces=True)
    assert out.shape == (3, 5, 8) and len(traces) == 2
    attention = traces[0].attention
    assert attention.shape == (3, 2, 5, 5) and traces[0].queries.shape == (3, 2, 5, 4)
    assert torch.allclose(attention.sum(-1), torch.ones(3, 2, 5))
    assert attention[1, :, :, 3:].abs().max() == 0
    changed = x.clone()
    changed[1, 3:] = 100.0  # padding content must not change the real positions
    assert torch.allclose(encoder(changed, mask)[1, :3], out[1, :3], atol=1e-5)


@pytest.mark.parametrize("kind", ["dnn", "sa"])
def test_user_tokenizers_shape_and_padding(fields, kind):
    users, items, _ = fields
    torch.manual_seed(0)
    if kind == "dnn":
        tokenizer = DNNTokenizer(users, items, dim=8, num_tokens=3, hidden=[16]).eval()
    else:
        tokenizer = SATokenizer(users, items, dim=8, num_tokens=3, max_history=4, layers=1, heads=2).eval()
    left_padded = user_input([[-1, -1, 5, 7], [1, 2, 3, 4]])
    tokens = tokenizer(left_padded)
    assert tokens.shape == (2, 3, 8)
    shorter = UserInput(left_padded.users, left_padded.history[:, 1:])
    # the same items (right-aligned, same positions) whatever the amount of padding
    assert torch.allclose(tokenizer(shorter)[0], tokens[0], atol=1e-5)
    empty = user_input([[-1, -1, -1, -1]])
    assert torch.isfinite(tokenizer(empty)).all()


def test_sa_tokenizer_queries_read_the_user_summary(fields):
    """Two users with different histories get different tokens even with the attention layers'
    contribution removed: the query tokens themselves start from the pooled user summary."""
    users, items, _ = fields
    torch.manual_seed(0)
    tokenizer = SATokenizer(users, items, dim=8, num_tokens=2, max_history=4, layers=1, heads=2).eval()
    for block in tokenizer.encoder.blocks:  # blocks become identities: output = norm(input)
        for p in (*block.attention.out.parameters(), *block.mlp[-1].parameters()):
            torch.nn.init.zeros_(p)
    tokens = tokenizer(UserInput(torch.tensor([0, 0]), torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])))
    assert not torch.allclose(tokens[0], tokens[1], atol=1e-3)


def test_item_tokenizer(fields):
    _, items, ds = fields
    tokenizer = ItemTokenizer(items, dim=8, num_tokens=2, hidden=[16])
    out = tokenizer(torch.arange(ds.num_items))
    assert out.shape == (ds.num_items, 2, 8)
    assert torch.allclose(tokenizer(torch.tensor([3]))[0], out[3], atol=1e-6)
