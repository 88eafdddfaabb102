"""Alias of :mod:`benchmarks.simulate` (the digital-twin stage's benchmark), under the issue's name.

Run: ``python -m benchmarks.twin [--quick]``.
"""

from benchmarks.simulate import main

if __name__ == "__main__":
    main()
