"""Synthetic-set generation: the mixing ops and plan (`mixing`), the generators of `generate.method`
(`generators`) and the one loop that fills a synthetic set with any of them (`generate`)."""
