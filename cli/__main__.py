"""`python -m cli` runs the same app as the `atlas` console script."""

from cli.main import main

main()
