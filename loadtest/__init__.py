"""Load tests and benchmarks: they measure over HTTP; only starting the servers uses `quiver`."""
