"""The applications built on the library: the ``vladkit`` command (``cli``: the parser;
``commands``: one module per command group; ``errors``: exit codes), the search service
and its web page (``serve``), and the demo (``demo``). The top layer: it may import every
folder, and no folder imports it."""
