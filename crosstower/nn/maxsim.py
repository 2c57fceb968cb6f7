"""MaxSim, ColBERT's late-interaction score, as pure functions of token sequences.

``s(u, i) = sum over the user's real tokens a of max over the item's real tokens b of q_a . d_b``:
max over item tokens, then sum over user tokens (a sum over all pairs would collapse into one dot
product of the summed vectors). Shared by the late-interaction model's loss and exhaustive scoring
and by its index's exact re-scoring, so the number trained is the number served.
"""

from __future__ import annotations

import torch

from crosstower.nn.tokens import TokenSequence


def maxsim(users: TokenSequence, items: TokenSequence) -> torch.Tensor:
    """Every user ``[B, L_u, m]`` against every item ``[N, L_i, m]``: scores ``[B, N]``.

    Padding item tokens never win the max; padding user tokens add nothing.
    """
    sim = torch.einsum("bam,nkm->bank", users.tokens, items.tokens)
    sim = sim.masked_fill(~items.mask[None, None], float("-inf"))
    best = sim.amax(dim=-1).nan_to_num(0.0, neginf=0.0)  # an item with no real token scores 0
    return (best * users.mask[..., None]).sum(dim=1)


def maxsim_pairs(users: TokenSequence, items: TokenSequence) -> torch.Tensor:
    """User ``b`` ``[B, L_u, m]`` against its own candidates ``[B, C, L_i, m]``: ``[B, C]``."""
    sim = torch.einsum("bam,bckm->bcak", users.tokens, items.tokens)
    sim = sim.masked_fill(~items.mask[:, :, None], float("-inf"))
    best = sim.amax(dim=-1).nan_to_num(0.0, neginf=0.0)
    return (best * users.mask[:, None]).sum(dim=-1)
