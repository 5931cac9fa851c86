"""``python -m alignti``: the command line."""

from alignti.cli import main

if __name__ == "__main__":
    main()
