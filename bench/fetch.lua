-- wrk script: POST /v1/features/fetch with random entity ids; counts every non-200 answer.
--
-- wrk -s bench/fetch.lua URL -- ENTITIES ID_MIN ID_MAX SEED POOL JOIN_KEY SELECTOR DEADLINE_MS [CONTEXT]
--
-- SELECTOR is the body's member naming what to fetch: `"features":[...]` or `"service":"name"`. CONTEXT, when
-- given, is `field:int,field:float,...`: each request carries those context fields, a random value per entity.
--
-- Each thread builds POOL complete requests up front (ids drawn uniformly from ID_MIN..ID_MAX, seeded, so
-- a run is repeatable) and cycles through them: the driver then spends next to nothing per request, which
-- matters when the gateway answers in well under a millisecond. `"strict": true` turns a degraded answer
-- (a backend failed or missed the deadline) into a 503, so a response that is not 200 is a failure.
-- done() prints one line `BENCH_JSON {...}` that the bench parses: counts, errors and latency percentiles
-- in microseconds from wrk's own histogram.

local threads = {}
local next_id = 1

function setup(thread)
  thread:set("thread_id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  local entities = tonumber(args[1])
  local id_min = tonumber(args[2])
  local id_max = tonumber(args[3])
  local seed = tonumber(args[4])
  local pool_size = tonumber(args[5])
  local join_key = args[6]
  local selector = args[7]
  local deadline = args[8]
  local context_fields = {}
  for field, kind in string.gmatch(args[9] or "", "([%w_]+):(%a+)") do
    context_fields[#context_fields + 1] = {field, kind}
  end
  math.randomseed(seed * 1000 + thread_id)
  non200 = 0
  statuses = {}
  pool = {}
  local headers = {["Content-Type"] = "application/json"}
  for p = 1, pool_size do
    local ids = {}
    for e = 1, entities do
      ids[e] = tostring(math.random(id_min, id_max))
    end
    local context = ""
    if #context_fields > 0 then
      local members = {}
      for c, spec in ipairs(context_fields) do
        local values = {}
        for e = 1, entities do
          values[e] = spec[2] == "int" and tostring(math.random(0, 23)) or string.format("%.2f", math.random() * 100)
        end
        members[c] = '"' .. spec[1] .. '":[' .. table.concat(values, ",") .. ']'
      end
      context = ',"context":{' .. table.concat(members, ",") .. '}'
    end
    local body = '{"entities":{"' .. join_key .. '":[' .. table.concat(ids, ",") .. ']},' .. selector .. context
      .. ',"deadline_ms":' .. deadline .. ',"strict":true}'
    pool[p] = wrk.format("POST", nil, headers, body)
  end
  at = 0
end

function request()
  at = at % #pool + 1
  return pool[at]
end

function response(status, headers, body)
  if status ~= 200 then
    non200 = non200 + 1
    local key = tostring(status)
    statuses[key] = (statuses[key] or 0) + 1
    if first_failure == nil then
      first_failure = key .. " " .. string.sub(body or "", 1, 300)
    end
  end
end

local function quote(text)
  return '"' .. string.gsub(text, '[%c"\\]', function(c) return string.format("\\u%04x", string.byte(c)) end) .. '"'
end

local function num(x)
  if x ~= x or x == math.huge or x == -math.huge then return "null" end
  return string.format("%.3f", x)
end

function done(summary, latency, requests)
  local failed, codes, failure = 0, {}, nil
  for _, thread in ipairs(threads) do
    failed = failed + thread:get("non200")
    local counted = thread:get("statuses")
    for code, n in pairs(counted) do
      codes[#codes + 1] = quote(code) .. ":" .. n
    end
    failure = failure or thread:get("first_failure")
  end
  local e = summary.errors
  local parts = {
    '"requests":' .. summary.requests,
    '"duration_us":' .. summary.duration,
    '"bytes":' .. summary.bytes,
    '"non200":' .. failed,
    '"non200_by_status":{' .. table.concat(codes, ",") .. '}',
    '"first_failure":' .. (failure and quote(failure) or "null"),
    '"errors":{"connect":' .. e.connect .. ',"read":' .. e.read .. ',"write":' .. e.write
      .. ',"status":' .. e.status .. ',"timeout":' .. e.timeout .. '}',
    '"latency_us":{"min":' .. latency.min .. ',"mean":' .. num(latency.mean) .. ',"stdev":' .. num(latency.stdev)
      .. ',"max":' .. latency.max .. ',"p50":' .. latency:percentile(50) .. ',"p90":' .. latency:percentile(90)
      .. ',"p99":' .. latency:percentile(99) .. ',"p99_9":' .. latency:percentile(99.9) .. '}',
  }
  io.write("BENCH_JSON {" .. table.concat(parts, ",") .. "}\n")
end
