"""benchmarks/text_contrast.py measures which swapped word moves the token states."""

import torch

from benchmarks.text_contrast import contrast
from engine.shapestory.world import COLOURS


class _ColourBlind:
    """A stand-in encoder whose token states see colour words only."""
    def encode(self, captions):
        out = []
        for c in captions:
            words = c.replace(",", " ").replace(".", " ").split()
            out.append(torch.stack([torch.tensor([1.0, float(list(COLOURS).index(w) + 1) if w in COLOURS else 0.0])
                                    for w in words]))
        return out


def test_a_word_the_encoder_ignores_changes_nothing():
    result = contrast(_ColourBlind())
    assert result["shape"]["mean"] == 0 and result["size"]["mean"] == 0
    assert result["colour"]["mean"] > 0 and result["colour"]["pairs"] == 28 * 3
