"""Sinks: projections that carry sealed log entries to external systems (one ``[sinks.NAME]`` each)."""
