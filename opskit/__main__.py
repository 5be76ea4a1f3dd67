"""`python -m opskit` runs the CLI."""

from opskit.cli import main

if __name__ == "__main__":
    main()
