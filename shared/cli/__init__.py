"""The distill command line: one module per command group."""
