"""``python -m veil.serve ...`` = ``veil serve ...`` (used to spawn cluster processes)."""

from veil.cli.serve import app

app(prog_name="veil serve")
