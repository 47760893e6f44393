"""The ``reid`` command line: one module per command, one error boundary in :mod:`reidcli.cli.app`."""
