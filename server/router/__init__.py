"""The KV-aware router: picks, for each request, the worker most likely to serve its prompt
from cache, weighed against load (docs/router.md)."""
