"""The studies: one module per study over one shared runner (runner.py), one variant registry (variants.py)
and one statistics helper (stats.py). `python study.py NAME` runs them."""
