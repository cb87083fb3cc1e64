"""Token embeddings, weights filled by the loader (uninitialised on construction)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardlm.layers.linear import Linear


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class TiedEmbedding(nn.Module):
    """Embedding that shares the LM head's matrix (tie_word_embeddings).

    The head stores the matrix as [hidden, vocab] (see Linear), so a token's embedding is a
    column: gathering a few columns is cheap, and the model keeps one copy of the matrix.
    """

    def __init__(self, lm_head: Linear) -> None:
        super().__init__()
        self.lm_head = [lm_head]  # a list, so the head's parameter is not registered twice

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head[0].weight_t.index_select(1, ids).t().contiguous()
