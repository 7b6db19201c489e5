"""Load tests and benchmarks; they speak HTTP only and import no other Quiver package at run time."""
