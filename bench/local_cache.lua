-- wrk script of bench/local_cache.py: POST /v1/features/fetch, bodies read from a file (one JSON per line, drawn
-- by the Python side: Zipf ids), each thread cycling through them from its own offset. Counts non-200 answers.
--
-- wrk -s bench/local_cache.lua URL -- BODIES_FILE
-- done() prints one line `BENCH_JSON {...}`: requests, seconds, non-200s, latency percentiles in microseconds.

local threads = {}
local next_id = 1

function setup(thread)
  thread:set("thread_id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  local headers = {["Content-Type"] = "application/json"}
  pool = {}
  for line in io.lines(args[1]) do
    pool[#pool + 1] = wrk.format("POST", nil, headers, line)
  end
  at = ((thread_id - 1) * 7919) % #pool
  non200 = 0
end

function request()
  at = at % #pool + 1
  return pool[at]
end

function response(status, headers, body)
  if status ~= 200 then
    non200 = non200 + 1
  end
end

function done(summary, latency, requests)
  local failed = 0
  for _, thread in ipairs(threads) do
    failed = failed + thread:get("non200")
  end
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"seconds":%.3f,"non200":%d,"errors":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration / 1e6, failed,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
