"""Real-time features (issue 13): sliding-window aggregations over event streams, kept as partial aggregates in
time tiles. `windows.py` is the window rule and the tile sizes; `aggregates.py` the partial aggregates, their
merge and their final values; `tiles.py` a batch of events turned into per-tile partials and tiles read back into
windowed values. Storage in the backends and ingestion (HTTP, Redis Streams, NATS JetStream) build on these.
"""
