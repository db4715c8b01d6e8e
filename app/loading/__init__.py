"""Bulk loading into feature groups: rows from a file (later Spark and a watched drop folder), validated as the
write path validates them, stored in batches, resumable after a crash."""
