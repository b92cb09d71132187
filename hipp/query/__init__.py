"""Answering a preference or a bound with a plan: the bound search and its optional polishing."""
