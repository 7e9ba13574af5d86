"""`python -m segsearch` runs the command line."""

from segsearch.cli import main

main()
