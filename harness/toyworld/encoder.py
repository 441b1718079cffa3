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
# A prompt is object phrases joined by "and", then "on ..." for the background: each separator starts a phrase.
PHRASE_SEPARATORS = ("and", "on")
MAX_PHRASES = 3  # two objects and the background


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


def check_toy_prompt(prompt: str) -> world.Scene:
    """The scene a prompt of the toy grammar states; a clear error for any other text (the empty prompt too)."""
    try:
        return world.parse_prompt(prompt)
    except ValueError:
        raise HarnessError(
            f"{prompt!r} is not a prompt of the toy grammar, e.g. {world.Scene.example_prompt()!r} "
            "(one or two '<size> <colour> <shape> moves <direction>' joined by 'and', then 'on a "
            "<background> background')"
        ) from None


def phrase_index(ids: torch.Tensor) -> torch.Tensor:
    """Which phrase (0 = first object, 1 = second object or background, ...) each word of ``(batch, words)`` is in."""
    separators = torch.zeros_like(ids, dtype=torch.bool)
    for word in PHRASE_SEPARATORS:
        separators |= ids == WORD_IDS[word]
    return separators.long().cumsum(dim=1).clamp(max=MAX_PHRASES - 1)


class PromptEncoder(nn.Module):
    """Word embeddings + learned positions + a 2-layer transformer encoder, plus each word's phrase summary.

    The phrase summary (mean of the phrase's encoded words, through a zero-initialised projection)
    puts an object's direction into its colour and shape words: the teacher's cross-attention finds an
    object by its colour and must read that object's motion there, not another object's. Padding
    outputs are zero.
    """

    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4, max_words: int = MAX_WORDS) -> None:
        super().__init__()
        self.words = nn.Embedding(len(VOCABULARY), dim)
        self.positions = nn.Parameter(torch.zeros(1, max_words, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.phrase_summary = nn.Linear(dim, dim)
        # Zero: the summary starts as a no-op, so a teacher trained without it loads unchanged and learns to use it.
        nn.init.zeros_(self.phrase_summary.weight)
        nn.init.zeros_(self.phrase_summary.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``(batch, words)`` ids -> ``(batch, words, dim)`` embeddings."""
        padding = ids == 0
        hidden = self.words(ids) + self.positions[:, : ids.shape[1]]
        # A fully padded row (the null prompt) would make attention all -inf: leave it unmasked, it is zeroed below.
        mask = padding & ~padding.all(dim=1, keepdim=True)
        hidden = self.norm(self.encoder(hidden, src_key_padding_mask=mask))
        words = (~padding).unsqueeze(-1).to(hidden.dtype)  # (batch, words, 1)
        membership = torch.nn.functional.one_hot(phrase_index(ids), MAX_PHRASES).to(hidden.dtype) * words
        phrase_means = membership.transpose(1, 2) @ hidden / membership.sum(dim=1).unsqueeze(-1).clamp(min=1)
        hidden = hidden + self.phrase_summary(membership @ phrase_means)
        return hidden * words
