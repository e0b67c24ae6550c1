"""A tiny byte-level causal transformer language model, cut into levels."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.modular import split_evenly

VOCAB = 256


class Embed(nn.Module):
    """Byte and learned position embeddings: (B, T) int64 -> (B, T, D)."""

    def __init__(self, d_model: int, context: int):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, d_model)
        self.positions = nn.Embedding(context, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x) + self.positions(torch.arange(x.shape[1], device=x.device))


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            self.qkv(self.norm1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        )
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class Head(nn.Module):
    """Final norm and projection to byte logits."""

    def __init__(self, d_model: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


def byte_transformer_levels(
    d_model: int = 128, n_layers: int = 4, n_heads: int = 4, context: int = 128
) -> Callable[[int], list[Callable[[], nn.Module]]]:
    """A causal byte LM: embedding, `n_layers` blocks and a head; the blocks are spread over the grid's
    levels, the embedding joins the first level and the head the last."""
    if d_model % n_heads:
        raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
    blocks: list[Callable[[], nn.Module]] = [lambda: Block(d_model, n_heads)] * n_layers

    def levels(n: int) -> list[Callable[[], nn.Module]]:
        groups = list(split_evenly(blocks, n))
        groups[0].insert(0, lambda: Embed(d_model, context))
        groups[-1].append(lambda: Head(d_model))
        return [lambda group=group: nn.Sequential(*(make() for make in group)) for group in groups]

    return levels
