"""The ``quiver`` command line: one typer app built from a module per command group."""

from __future__ import annotations

import typer

from quiver import access, adapters, bench, loadtest, merged, rag, serving, training

app = typer.Typer(no_args_is_help=True, help="Serve many LoRA adapters over one base model.")
app.add_typer(adapters.adapters_app, name="adapters")
app.add_typer(serving.model_app, name="model")
app.add_typer(rag.rag_app, name="rag")
app.add_typer(merged.deploy_app, name="deploy")
app.add_typer(access.keys_app, name="keys")
app.add_typer(access.tenants_app, name="tenants")
# `quiver --help` lists the commands in this order, then the groups.
app.command("usage")(access.usage)
app.command()(serving.up)
app.command()(merged.merge)
app.command()(training.train)
app.command("eval")(training.eval_)
app.command()(loadtest.loadtest)
app.command()(training.demo)
app.command()(bench.bench)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
