"""Course tooling: exercises (one module per notebook), checkers, handouts, plotting helpers."""
