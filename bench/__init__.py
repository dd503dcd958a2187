"""Benchmarks: our gateway side by side with LiteLLM and a pass-through floor (``python -m bench.run``)."""
