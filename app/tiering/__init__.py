"""Tiers and their cost: a group's hot cache over its system of record (issue 14)."""
