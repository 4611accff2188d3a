"""Runs -> tables and figures: `audiofx report` (build.py, plots.py) and `audiofx compare`
(compare.py)."""
