"""Benchmarks of the worker against the real local broker: `python -m bench` (docs/benchmarks.md).

What they measure is the worker, not inference: the backends are fixtures that answer with a
small pre-encoded WAV, instantly or after a fixed latency.
"""
