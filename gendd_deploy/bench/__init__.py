"""Benchmarks: commands that print a table and write JSON (tests never assert wall-clock time)."""
