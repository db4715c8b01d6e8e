"""Helpers the test files share, one module per kind, so that no test file imports another:

- `registries`: where the test servers are (REDIS_URL, PG_DSN), per-test isolation (`Names`) and registries.
- `clients`: talking to a gateway as a client does: rows to write, `write`, `fetch`, JSON headers.
- `gateways`: the gateway under test, in this process or as a real `python -m app serve` process.
- `servers`: real servers a test owns: free ports, a TCP proxy, redis-server, a Redis Cluster, PostgreSQL.
- `faults`: ways to make a backend fail for real: a closed port, a paused or busy Redis, a locked table.
- `waiting`: waiting for an observable condition instead of sleeping a guessed time.
- `clock`: `ManualClock`, for code that takes a clock: the test moves time by hand.
"""

# bench/redis_cluster_buckets.py imports these two from `tests.support`, which was a module until the helpers
# became this package; tests import them from `tests.support.servers`.
from tests.support.servers import RedisClusterProcesses, RedisProcess

__all__ = ["RedisClusterProcesses", "RedisProcess"]
