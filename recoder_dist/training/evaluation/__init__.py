"""Exact top k and ranking metrics over users, of a whole model or of sharded item tables."""
