"""The RAG path: collections of embedded document chunks, retrieval, and prompts that cite their sources.

index = open_index(index_url(settings))          # embedded SQLite, or PostgreSQL + pgvector
ingest(index, Embedder(), "docs", [Path("guide.md")])
rag = RagPath(index, Embedder())
sources = await rag.aretrieve("docs", question(messages), k=4)
prompt = rag.build_messages(messages, sources, max_prompt_tokens=1500)
"""

from gateway.rag.backends import EmbeddedIndex, PgVectorIndex, index_url, open_index
from gateway.rag.chunking import Chunk, ChunkingConfig, chunk_document
from gateway.rag.documents import Document, read_document
from gateway.rag.index import CollectionInfo, Source, VectorIndex
from gateway.rag.ingest import IngestedFile, ingest
from gateway.rag.retrieval import RagPath, RagPrompt, build_messages, question

__all__ = [
    "Chunk",
    "ChunkingConfig",
    "CollectionInfo",
    "Document",
    "EmbeddedIndex",
    "IngestedFile",
    "PgVectorIndex",
    "RagPath",
    "RagPrompt",
    "Source",
    "VectorIndex",
    "build_messages",
    "chunk_document",
    "index_url",
    "ingest",
    "open_index",
    "question",
    "read_document",
]
