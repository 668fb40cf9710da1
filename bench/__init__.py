"""Benchmarks: flowbridge and its peers side by side, printing ratios (`python -m bench`)."""
