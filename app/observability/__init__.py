"""Prometheus metrics at /metrics and JSON logs that carry the job id, for the API and the worker."""
