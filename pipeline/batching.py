"""Token-budget batching, shared by the embedder and the teacher scorer.

Inputs are sorted by their exact token length, longest first, and cut into batches of at most
``budget`` padded tokens: short texts share large batches, long ones small batches, and almost
nothing is spent on padding.
"""

from __future__ import annotations

import numpy as np


def token_batches(lengths, budget: int) -> list[np.ndarray]:
    """Indices into ``lengths``, longest first, in batches of at most ``budget`` padded tokens.

    A batch holds ``budget // b`` inputs, where ``b`` is the power of two at or above its longest
    length. Within a band of lengths the batch count is fixed, so the padded size of each batch
    only shrinks: glibc's allocator then reuses the last batch's blocks. Filling every batch to
    exactly the budget makes sizes wobble up and down by a few tokens, and each wobble upward
    left a freed block too small to reuse: 12 MB more resident memory per batch for MiniLM,
    +200 MB over the demo corpus.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        band = 1 << max(int(lengths[order[start]]) - 1, 0).bit_length()
        size = max(1, budget // band)
        batches.append(order[start : start + size])
        start += size
    return batches
