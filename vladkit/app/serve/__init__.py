"""``vladkit serve``: the search service over an index folder (:mod:`.service`), its ASGI
application and web page (:mod:`.web`, the page in ``static/``), and the uvicorn server
with its guards on connections (:mod:`.server`)."""
