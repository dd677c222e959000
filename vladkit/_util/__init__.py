"""Private helpers every folder may use (all but :mod:`vladkit.kernels`): atomic files
(``io``), thread limits (``threads``), the BLAS libraries (``blas``), the defaults the
command line shows before anything heavy loads (``defaults``), and the ctypes binding of
VLFeat that tests and benchmarks compare against (``vlfeat``). Imports nothing from
vladkit but :mod:`vladkit._version`."""
