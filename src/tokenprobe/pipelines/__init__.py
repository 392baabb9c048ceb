"""Commands as short pipelines of named stages over the rooms below (data, models, extract, probes,
analysis, report)."""
