"""Benchmarks behind ``pdserve bench``: each measures pdserve beside a baseline and writes JSON."""
