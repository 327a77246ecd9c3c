"""`python -m slidekit` runs the CLI."""
from slidekit.cli import main

main()
