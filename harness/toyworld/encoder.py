"""The toy model's small learned prompt encoder over the closed vocabulary of the prompt grammar."""

from __future__ import annotations

import torch
from torch import nn

from harness.errors import HarnessError
from harness.toyworld import world

GRAMMAR_WORDS = ("a", "and", "moves", "on", "background", "gradient")
VOCABULARY: tuple[str, ...] = (
    "<pad>",
    *GRAMMAR_WORDS,
    *world.SHAPES,
    *world.PALETTE,
    *world.SIZES,
    *world.DIRECTIONS,
    *world.BACKGROUNDS,
    *world.GRADIENTS,
)
WORD_IDS = {word: index for index, word in enumerate(VOCABULARY)}
MAX_WORDS = 24


def tokenize(prompts: list[str], max_words: int = MAX_WORDS) -> torch.Tensor:
    """Word ids ``(batch, max_words)``, 0-padded; an empty prompt is all padding (the CFG null prompt)."""
    ids = torch.zeros(len(prompts), max_words, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        words = prompt.lower().split()
        unknown = sorted({w for w in words if w not in WORD_IDS})
        if unknown:
            raise HarnessError(
                f"the toy model only understands its prompt grammar (e.g. {world.Scene.example_prompt()!r}); "
                f"unknown word(s): {', '.join(unknown)}"
            )
        if len(words) > max_words:
            raise HarnessError(f"toy prompts have at most {max_words} words, got {len(words)}")
        ids[row, : len(words)] = torch.tensor([WORD_IDS[w] for w in words], dtype=torch.long)
    return ids


class PromptEncoder(nn.Module):
    """Word embeddings + learned positions + a 2-layer transformer encoder; padding outputs are zero."""

    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4, max_words: int = MAX_WORDS) -> None:
        super().__init__()
        self.words = nn.Embedding(len(VOCABULARY), dim)
        self.positions = nn.Parameter(torch.zeros(1, max_words, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``(batch, words)`` ids -> ``(batch, words, dim)`` embeddings."""
        padding = ids == 0
        hidden = self.words(ids) + self.positions[:, : ids.shape[1]]
        # A fully padded row (the null prompt) would make attention all -inf: leave it unmasked, it is zeroed below.
        mask = padding & ~padding.all(dim=1, keepdim=True)
        hidden = self.norm(self.encoder(hidden, src_key_padding_mask=mask))
        return hidden * (~padding).unsqueeze(-1)
