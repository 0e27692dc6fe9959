"""CLI subcommands. Each module defines ``register(subparsers, parents)``; see :mod:`featurelt.cli`."""
