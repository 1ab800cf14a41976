"""Contracts: every file one stage writes for another (plans, completion records, shards, scores, students)."""
