"""What a run leaves for people: results.json/csv, report.md, plot.png and WandB runs.

Reading a run folder needs neither torch nor transformers (`tokenprobe report` stays fast).
"""
