"""The `vespo` subcommands: each parses its arguments and drives the layers below."""
