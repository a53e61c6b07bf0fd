"""The command line (python -m app, or the `kvthreads` script): one module per subcommand.

Each module has `register(subparsers)`, which adds its parser and sets `handler(settings, args)
-> int` as its default. app/__main__.py lists the modules.
"""
