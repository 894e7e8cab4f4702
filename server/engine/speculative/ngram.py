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
        # Candidate occurrences end where the last token occurs earlier: one pass over the
        # sequence, then each candidate is extended backwards, all candidates at once. Long
        # contexts cost one comparison per token, not one per token and suffix length.
        ends = np.flatnonzero(seq[: length - 1] == seq[length - 1])
        if not ends.size:
            return []
        matched = np.ones(ends.size, dtype=np.int64)
        alive = np.ones(ends.size, dtype=bool)
        for back in range(1, min(self.max_n, length - 1)):
            before = ends - back
            alive &= before >= 0
            alive[alive] = seq[before[alive]] == seq[length - 1 - back]
            if not alive.any():
                break
            matched += alive
        best = int(matched.max())
        if best < self.min_n:
            return []
        # The latest of the longest matches: the likeliest to continue the same way.
        end = int(ends[np.flatnonzero(matched == best)[-1]])
        return seq[end + 1 : end + 1 + k].tolist()
