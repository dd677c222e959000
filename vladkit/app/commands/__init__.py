"""What each ``vladkit`` command does, one module per command group (the parser and the
dispatch are in :mod:`vladkit.app.cli`, which imports a command's module only once the
arguments are parsed: ``--help`` and usage errors never load numpy, scikit-learn, numba
or faiss). They compose the library and hold no algorithm; :mod:`.common` holds what
they share."""
