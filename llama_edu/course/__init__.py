"""Course tooling: the exercises and their checkers, student handouts, plotting helpers for the notebooks."""
