"""Documents, chunking, embeddings and hybrid search (BM25 + dense vectors, fused).

Import the submodules you need; this package import is kept free of heavy dependencies.
"""
