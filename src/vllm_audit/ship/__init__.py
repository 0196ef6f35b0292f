"""The read side: projections of the local log, each with its own cursor, driven by one runner."""
