"""``make bench``: enricher's figures measured on the embedded stack (see ``bench/run.py``)."""
