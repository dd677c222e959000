"""Searching image vectors: the faiss index and its folder (``index``, ``index_files``,
``search_folder``), PCA-whitening (``whitening``), geometric verification (``spatial``)
and re-ranking (``rerank``), and scoring result lists (``ground_truth``, ``metrics``).
Imports the pipeline and everything below it; never netvlad or app."""
