"""Disaggregated serving between worker processes: the decode worker pulls a prompt's K/V
from a prefill worker over HTTP (transfer.py); the prefill worker's endpoint (endpoint.py)."""
