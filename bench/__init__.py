"""Benchmarks and soaks for lmproxy. Nothing here is imported by lmproxy itself."""
