"""`python -m idemclient`: the same as the `idemclient` command."""

from __future__ import annotations

from ._cli import run

if __name__ == "__main__":
    run()
