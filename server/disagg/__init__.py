"""Disaggregated serving between worker processes: the decode worker pulls a prompt's K/V
from a prefill worker over HTTP (transfer.py); the prefill worker's endpoint (endpoint.py)."""

# Set by the router on a request it sends to a decode worker: HOST:PORT of the prefill workers
# to pull the prompt's K/V from, preferred first. Here, free of heavy imports, for the router.
PREFILL_PEERS_HEADER = "x-bisllm-prefill-peers"
