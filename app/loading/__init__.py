"""Bulk loading into feature groups (`feature-gateway materialize`): rows validated as the write path
validates them, stored in batches, resumable after a crash.

`sources` reads Parquet, CSV (typed by `csv_typing`) and JSON Lines files; `checkpoint` records how far a
load got; `load` runs a load from any `Source`, which is what the Spark loader and the watched drop folder
planned next will reuse. The progress bar is the CLI's (`app.cli.ProgressBar`).
"""
