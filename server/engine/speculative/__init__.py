"""Speculative decoding: draft proposers and the verification the engine runs on their drafts."""
