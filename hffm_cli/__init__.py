"""The ``hffm`` command line: above the core (hffm), the services and the benchmarks, which it drives."""
