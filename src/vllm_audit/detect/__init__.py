"""Detection over the record stream: rules, shared windows in Redis, alerts appended to the log.

Start with ``docs/detection.md``. The detector is a projection (``projection.py``) built by
``ship/build.py`` when ``[detect] enabled``; rules live in one file (``rules.py``,
``rules/default.yaml``); ``sigma.py`` exports them as Sigma; ``classifier.py`` is the local model.
"""
