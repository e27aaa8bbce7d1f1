"""The `jobstream` command line: the entry point, one module per command family, one renderer."""
