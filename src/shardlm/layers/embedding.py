"""Token embeddings, vocabulary-parallel across tensor-parallel ranks.

Each rank holds the rows [vocab_start, vocab_end) of the (padded) vocabulary. A rank looks up
the ids in its range, contributes zeros for the others, and an AllReduce sums the ranks'
contributions: exactly one rank contributed each row. With one rank it is a plain lookup.
Weights are filled by the loader (uninitialised on construction).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardlm.distributed.parallel_state import TPContext
from shardlm.layers.linear import Linear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_start: int, vocab_end: int, embedding_dim: int, tp: TPContext):
        super().__init__()
        self.vocab_start, self.vocab_end = vocab_start, vocab_end
        self.tp = tp
        self.weight = nn.Parameter(
            torch.empty(vocab_end - vocab_start, embedding_dim), requires_grad=False
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.enabled:
            return F.embedding(ids, self.weight)
        local, outside = _local_ids(ids, self.vocab_start, self.vocab_end)
        x = F.embedding(local, self.weight).masked_fill_(outside[:, None], 0.0)
        return self.tp.all_reduce(x)


class TiedEmbedding(nn.Module):
    """Embedding that shares the LM head's matrix (tie_word_embeddings).

    The head stores its slice of the matrix as [hidden, vocab slice] (see Linear), so a token's
    embedding is a column: gathering a few columns is cheap, and the model keeps one copy.
    """

    def __init__(self, lm_head: Linear, vocab_start: int, vocab_end: int, tp: TPContext):
        super().__init__()
        self.lm_head = [lm_head]  # a list, so the head's parameter is not registered twice
        self.vocab_start, self.vocab_end = vocab_start, vocab_end
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight_t = self.lm_head[0].weight_t
        if not self.tp.enabled:
            return weight_t.index_select(1, ids).t().contiguous()
        local, outside = _local_ids(ids, self.vocab_start, self.vocab_end)
        x = weight_t.index_select(1, local).t().contiguous().masked_fill_(outside[:, None], 0.0)
        return self.tp.all_reduce(x)


def _local_ids(ids: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids shifted into this rank's slice (0 where outside it) and the outside mask."""
    outside = (ids < start) | (ids >= end)
    return (ids - start).masked_fill_(outside, 0), outside
