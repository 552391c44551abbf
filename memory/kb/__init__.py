"""The knowledge base: curated bilingual concept cards, user documents, Chroma + BM25 retrieval."""
