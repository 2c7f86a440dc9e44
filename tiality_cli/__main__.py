"""``python -m tiality_cli`` and the ``tiality`` console script."""

from __future__ import annotations


def prepare_process() -> None:
    """Settles what a short-lived command's process pays for before it imports anything heavy."""
    import gc
    import os

    # Start-up makes no garbage worth collecting: without the collector the imports cost ~4 % less CPU
    # (the Pi's sender starts faster). The long-running commands turn it back on (cli.common.long_work).
    gc.disable()
    # numpy's OpenBLAS starts a thread per extra core when numpy is imported, and each spins for work
    # that never comes (0.1 s of CPU here, three of them on a Pi Zero 2): tiality's arrays are far too
    # small for threaded BLAS. An explicit setting in the environment wins (docs/performance.md).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main() -> None:
    prepare_process()
    from tiality_cli.cli.app import main as run

    run()


if __name__ == "__main__":
    main()
