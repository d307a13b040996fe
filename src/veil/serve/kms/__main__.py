"""``python -m veil.serve.kms ...`` = ``veil kms ...`` (used to spawn the KMS process)."""

from veil.cli.kms import app

app(prog_name="veil kms")
