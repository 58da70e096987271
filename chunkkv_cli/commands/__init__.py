"""One module per command; `chunkkv_cli.cli` wires them into the app."""
