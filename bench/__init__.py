"""``make bench``: load client, baseline app and scenarios (see ``bench/__main__.py``)."""
