"""NGram (prompt-lookup) drafts: no draft model, only the request's own tokens.

When the last n tokens of a sequence occurred earlier in it (in the prompt or the output so
far), the tokens that followed that earlier occurrence are a cheap guess at what comes next.
Editing, summarising and code completion repeat their input a lot, so the guess is often right.
The longest suffix that matches wins (n from `max_n` down to `min_n`), and among its
occurrences the most recent one: it is the likeliest to continue the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NGramProposer:
    def __init__(self, num_draft_tokens: int, min_n: int = 1, max_n: int = 4) -> None:
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.num_draft_tokens = num_draft_tokens
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, tokens: Sequence[int], limit: int | None = None) -> list[int]:
        """Up to `limit` (default num_draft_tokens) tokens that may follow `tokens`; [] when no
        suffix of length min_n..max_n occurred earlier."""
        k = self.num_draft_tokens if limit is None else min(limit, self.num_draft_tokens)
        length = len(tokens)
        if k < 1 or length < self.min_n + 1:
            return []
        seq = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = seq[length - n :]
            # Windows that start early enough to have at least one token after them, the
            # suffix itself excluded.
            windows = sliding_window_view(seq[: length - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return seq[start : start + k].tolist()
        return []
