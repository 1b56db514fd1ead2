"""The `kledger` command: the typer app and what commands share in `app`, one module per command
group, rendering in `output`. Commands parse, make library calls and print; `main.run` registers
them and is the only place that turns errors into exit codes."""
