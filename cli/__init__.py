"""The `atlas` command line: thin Typer commands over atlas/ and workers/."""
