"""From folders of images to files of vectors, within a memory budget: batches sized by
memory (``budget``), :class:`~vladkit.pipeline.image_encoder.ImageEncoder`, the recipe that
made a set of vectors (``recipe``), the files they are written to (``encodings``: one
``.npz``; ``sharded``: a folder of shards), resumable jobs here or on Dask (``jobs``) and
the locks that keep two jobs apart (``locking``). Imports features, vocabulary, encoders
and the helpers; never retrieval, netvlad or app."""
