"""What the single-node and the cluster Redis backends share: the write script, its arguments, and which
errors are Redis' own answers.

Compares the 8 event-time bytes after the version byte (big-endian, biased: byte order = time order, see
app/layout.py) and writes only where the stored row is not newer, setting the key to expire at the row's
reclaim time (backends/base.py). Atomic for all the keys of one call: the whole batch on a single Redis, one
slot on a cluster.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.exceptions import BusyLoadingError, ResponseError

from app.registry.model import Group
from backends.base import WriteRow, reclaim_us

_WRITE_SCRIPT = """
local written = 0
for i, key in ipairs(KEYS) do
  local new = ARGV[2 * i - 1]
  local old = redis.call('GET', key)
  if not old or string.sub(old, 2, 9) COMPARE string.sub(new, 2, 9) then
    local expire_at = ARGV[2 * i]
    if expire_at == '' then
      redis.call('SET', key, new)
    else
      redis.call('SET', key, new, 'PXAT', expire_at)
    end
    written = written + 1
  end
end
return written
"""
WRITE_IF_NEWER = _WRITE_SCRIPT.replace("COMPARE", "<=")  # a write replaces a row of the same event time
# A copy (a cache's promotion, a move's backfill) never replaces a row of the same event time: that row may be a
# correction written since the copy was read, under the same event time.
COPY_IF_NEWER = _WRITE_SCRIPT.replace("COMPARE", "<")


def script_args(group: Group, rows: Sequence[WriteRow], expire_by_ms: int | None = None) -> list[bytes | str]:
    """ARGV for WRITE_IF_NEWER: per row its blob and its reclaim time in Unix milliseconds ('' for never).

    Floor to the millisecond: Redis deletes a key once its clock passes that millisecond, so never before the
    read path's boundary. A reclaim time already past still goes as a positive time (Redis refuses 0 and
    negative ones): the key is then gone at once, as the row already reads MISSING. `expire_by_ms`: no key
    lives past it (a cache's copy).
    """
    args: list[bytes | str] = []
    for row in rows:
        expires = reclaim_us(group, row.event_us)
        ms = None if expires is None else max(expires // 1000, 1)
        if expire_by_ms is not None:
            ms = expire_by_ms if ms is None else min(ms, expire_by_ms)
        args += [row.blob, "" if ms is None else str(ms)]
    return args


def server_answered(exc: BaseException) -> bool:
    """An error reply (OOM, READONLY, WRONGTYPE): Redis is up. Not LOADING: it cannot take work yet."""
    return isinstance(exc, ResponseError) and not isinstance(exc, BusyLoadingError)
