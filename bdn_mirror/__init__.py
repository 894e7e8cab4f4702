"""BDN-style weight mirroring and hydration. Implemented by a later issue."""
