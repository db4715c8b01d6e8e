"""The serving core: typed requests in, typed answers out, under explicit limits.

It knows no HTTP framework, settings object or environment: `routers/` decodes and encodes, the composition
root (`app/main.py`, `app/cli.py`) wires settings, registry and backends into a `Gateway`.
"""
