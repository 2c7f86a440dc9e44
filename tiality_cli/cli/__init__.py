"""The command line: the Typer app, its subcommands and live views (the only user of typer and rich)."""
