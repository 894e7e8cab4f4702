"""Serving runtime (engine workers, router, autoscaler, metrics). Implemented by later issues."""
