"""``python -m jobflow``: the same as the ``jobflow`` command."""

from jobflow.cli import main

if __name__ == "__main__":
    main()
