"""Connectors: vision features -> LM hidden space (the paper's "mlp2x_gelu"), and the RAG
connector that maps retrieved memory values to extra LM input tokens (TinyAlign, arXiv 2505.12884)."""

from __future__ import annotations

from torch import nn


class Connector(nn.Sequential):
    """`Linear(d_in -> H) -> GELU -> Linear(H -> H)`; `[B, N, d_in] -> [B, N, H]`."""

    def __init__(self, d_in: int, hidden: int):
        super().__init__(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden))


class RAGConnector(Connector):
    """The paper's RAG connector, `Linear(d_v -> H) -> GELU -> Linear(H -> H)`, applied per value token."""
