"""The bottom layer: what every other package shares, importing nothing of Quiver.

The error tree (``core.errors``), starting and stopping processes (``core.processes``, ``core.vllm_server``),
benchmark records (``core.benchmarks``), the embedding interface (``core.embeddings``), file checksums,
the embedded base model's preparation (``core.embedded``), which extras this install has (``core.extras``) and the
gateway's thread caps (``core.threads``).
"""
