"""`python -m distgan COMMAND [ARGS]`: the same as `distgan COMMAND [ARGS]` (distgan/cli.py)."""

from distgan.cli import main

if __name__ == "__main__":
    main()
