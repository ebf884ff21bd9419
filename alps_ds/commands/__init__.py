"""Subcommands of ``alps-ds``; every public module here is discovered by :mod:`alps_ds.cli`."""
