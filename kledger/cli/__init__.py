"""The `kledger` command: typer app, one module per command group. Commands parse, make one
library call and print; `main.run` is the only place that turns errors into exit codes."""
