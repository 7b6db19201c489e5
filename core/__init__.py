"""The bottom layer: what every other package shares, importing nothing of Quiver.

The error tree (``core.errors``), starting and stopping processes (``core.processes``, ``core.vllm_server``),
benchmark records (``core.benchmarks``), the embedding interface (``core.embeddings``, ONNX Runtime), file
checksums, the checksummed cache (``core.cache``) and what ``quiver model prepare`` builds in it: the embedded
base model (``core.embedded``) and the embeddings' ONNX export (``core.embedding_export``); which extras this
install has (``core.extras``) and the gateway's thread caps (``core.threads``).
"""
