"""Parallelism across devices and processes on torch.distributed: tensor parallel shards,
expert-parallel placement and load balancing, process groups and the rank launcher."""
