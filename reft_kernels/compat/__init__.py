"""Compatibility with other ReFT libraries (:mod:`.pyreft`)."""
