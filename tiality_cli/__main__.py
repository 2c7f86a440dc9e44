"""``python -m tiality_cli`` and the ``tiality`` console script."""

from __future__ import annotations


def main() -> None:
    from tiality_cli.cli.app import app

    app()


if __name__ == "__main__":
    main()
