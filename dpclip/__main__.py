"""``python -m dpclip``: the dpclip command line (see :mod:`dpclip.cli`)."""

from dpclip.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
