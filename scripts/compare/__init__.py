"""The pieces of ``scripts/compare_optimizers.py``: training runs (:mod:`.runs`), CSV and the
numbers read from it (:mod:`.tables`), PNG plots (:mod:`.plots`), the Markdown report
(:mod:`.report`). Split only to keep each file readable; the script is the entry point."""
