"""``python -m resofilter <command> …``: the same entry point as the ``resofilter`` console script."""

from resofilter.cli import main

if __name__ == "__main__":
    main()
