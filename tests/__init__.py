"""The tests, a package so that tests and benchmarks import shared support as ``tests.helpers``."""
