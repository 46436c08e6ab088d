"""The ``sottovoce`` command."""
import typer

app = typer.Typer(no_args_is_help=True)


@app.command()
def version() -> None:
    print("0.1.0")


def main() -> None:
    app()
