"""``vladkit serve``: the web service of :mod:`vladkit.app.serve`, whose optional extra is
imported here only.
"""

from __future__ import annotations

import sys

from ..errors import EXIT_OK, EXIT_USAGE, CommandError, UsageError

#: The distributions of the serve extra, by the name they are imported under.
SERVE_MODULES = ("starlette", "uvicorn", "python_multipart", "multipart", "anyio")


def cmd_serve(args):
    # The web stack is an optional extra, imported here only: the other commands never
    # need it, and without it this command says what to install.
    try:
        from ..serve.web import allowed_hosts_for, create_app
        from ..serve.server import run
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in SERVE_MODULES:
            raise
        print(f"vladkit: error: 'vladkit serve' needs the serve extra ({exc.name} is not installed): "
              "python -m pip install 'vladkit[serve]'", file=sys.stderr)
        return EXIT_USAGE
    if args.port > 65535:
        raise UsageError(f"--port must be at most 65535, got {args.port}")
    try:
        allowed_hosts = allowed_hosts_for(args.host, args.allowed_host)
    except ValueError as error:
        raise UsageError(str(error)) from None
    app = create_app(args.index, max_upload_bytes=max(1, round(args.max_upload_mb * 1e6)),
                     max_pixels=args.max_pixels, timeout=args.timeout, max_concurrency=args.max_concurrency,
                     n_jobs=args.jobs, allowed_hosts=allowed_hosts, image_root=args.image_root)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"vladkit: note: listening on {args.host}: whoever reaches this machine can search the index and "
              "see its images and their paths (the ids); put an authenticating proxy in front to restrict that",
              file=sys.stderr)
    if not args.quiet:
        service = app.state.service
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"vladkit: serving {args.index} ({len(service.ids):,} images"
              f"{', re-ranking available' if service.store is not None else ''}) at http://{host}:{args.port}/ "
              "(Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        run(app, host=args.host, port=args.port, quiet=args.quiet,
            max_connections_per_client=args.max_connections_per_client, header_timeout=args.header_timeout)
    except KeyboardInterrupt:  # uvicorn stops cleanly, then passes Ctrl-C on
        pass
    except SystemExit as exc:  # uvicorn's way of failing to start (its log line says why)
        if exc.code:
            raise CommandError(f"could not serve on {args.host}:{args.port} (the port is taken, or the address "
                               "is not this machine's)") from None
    return EXIT_OK
