"""``python -m graphscale ...`` runs the command line, the same as the ``graphscale`` script."""

from graphscale.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
