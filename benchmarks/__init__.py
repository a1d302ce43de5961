"""Benchmarks of molf_ds, run from a git checkout: the lab behind `molf-ds bench` (`benchmarks.lab`) and the
single-purpose scripts beside it."""
