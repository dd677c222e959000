"""The hot loops, and nothing else: numba kernels and the BLAS products they make by blocks
of rows, one module per family (products, nearest words, Gaussian terms, dense SIFT, soft
codes, accumulation, the encoders' fused kernels). Nothing here imports scikit-learn or any
part of vladkit outside this folder."""
