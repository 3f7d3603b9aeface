"""``python -m diffeat``: the ``diffeat`` command."""

from diffeat.cli.main import main

if __name__ == "__main__":
    main()
