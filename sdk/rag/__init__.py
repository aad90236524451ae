"""The knowledge assistant's parts (issue 9, in progress): documents read into located
sections (readers) and cut into chunks that respect headings and sentence ends (chunking).
The index, hybrid retrieval, rejection and `hanlin kb` build on these."""

from .chunking import Chunk, chunk_sections, sentences
from .index import Hit, IngestReport, KBError, KnowledgeBase, tokenize
from .readers import Found, Section, Unreadable, markdown_sections, read_document, walk

__all__ = ["KnowledgeBase", "Hit", "IngestReport", "KBError", "tokenize", "Chunk", "chunk_sections", "sentences", "Found", "Section", "Unreadable", "markdown_sections", "read_document", "walk"]
