"""Compatibility with other ReFT libraries (:mod:`.pyreft`) and across transformers versions
(:mod:`.kv_cache`: the KV-cache keyword, ``cache`` or ``past_key_values``)."""
