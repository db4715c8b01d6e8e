-- wrk script: POST /v1/features/fetch with random entity ids; counts every non-200 answer.
--
-- wrk -s bench/fetch.lua URL -- ENTITIES ID_MIN ID_MAX SEED POOL JOIN_KEY SELECTOR DEADLINE_MS [CONTEXT [ACCEPT [IDS]]]
--
-- SELECTOR is the body's member naming what to fetch: `"features":[...]` or `"service":"name"`. CONTEXT, when
-- given, is `field:int,field:float,...`: each request carries those context fields, a random value per entity.
-- ACCEPT, when not empty, is sent as the `Accept` header, and the answers' Content-Type values are counted
-- (`content_types` in the JSON line), so the bench sees which encoding it measured. IDS, when not empty, is a
-- file of ids, one a line, drawn by the bench (Zipf: Lua has no sampler for it): requests take them in file
-- order, ENTITIES at a time, each thread from its own offset, instead of drawing uniform ids; POOL is ignored.
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
  local accept = args[10] or ""
  local ids_file = args[11] or ""
  math.randomseed(seed * 1000 + thread_id)
  non200 = 0
  statuses = {}
  content_types = {}
  count_types = accept ~= ""
  pool = {}
  local headers = {["Content-Type"] = "application/json"}
  if count_types then
    headers["Accept"] = accept
  end
  local drawn = nil
  if ids_file ~= "" then
    drawn = {}
    for line in io.lines(ids_file) do
      if line ~= "" then
        drawn[#drawn + 1] = line
      end
    end
    pool_size = math.floor(#drawn / entities)
    if pool_size < 1 then
      error("fetch.lua: " .. ids_file .. " holds fewer than " .. entities .. " ids")
    end
  end
  for p = 1, pool_size do
    local ids = {}
    for e = 1, entities do
      if drawn then
        ids[e] = drawn[(p - 1) * entities + e]
      else
        ids[e] = tostring(math.random(id_min, id_max))
      end
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
  -- Threads of one run start at different places of a drawn sequence, so they do not send the same ids in step
  at = drawn and ((thread_id - 1) * 7919) % #pool or 0
end

function request()
  at = at % #pool + 1
  return pool[at]
end

function response(status, headers, body)
  if count_types then
    local kind = headers["content-type"] or headers["Content-Type"] or "none"
    content_types[kind] = (content_types[kind] or 0) + 1
  end
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
  local failed, by_code, failure, by_type = 0, {}, nil, {}
  for _, thread in ipairs(threads) do
    failed = failed + thread:get("non200")
    for code, n in pairs(thread:get("statuses")) do
      by_code[code] = (by_code[code] or 0) + n
    end
    for kind, n in pairs(thread:get("content_types")) do
      by_type[kind] = (by_type[kind] or 0) + n
    end
    failure = failure or thread:get("first_failure")
  end
  local codes, types = {}, {}
  for code, n in pairs(by_code) do
    codes[#codes + 1] = quote(code) .. ":" .. n
  end
  for kind, n in pairs(by_type) do
    types[#types + 1] = quote(kind) .. ":" .. n
  end
  local e = summary.errors
  local parts = {
    '"requests":' .. summary.requests,
    '"duration_us":' .. summary.duration,
    '"bytes":' .. summary.bytes,
    '"non200":' .. failed,
    '"non200_by_status":{' .. table.concat(codes, ",") .. '}',
    '"content_types":{' .. table.concat(types, ",") .. '}',
    '"first_failure":' .. (failure and quote(failure) or "null"),
    '"errors":{"connect":' .. e.connect .. ',"read":' .. e.read .. ',"write":' .. e.write
      .. ',"status":' .. e.status .. ',"timeout":' .. e.timeout .. '}',
    '"latency_us":{"min":' .. latency.min .. ',"mean":' .. num(latency.mean) .. ',"stdev":' .. num(latency.stdev)
      .. ',"max":' .. latency.max .. ',"p50":' .. latency:percentile(50) .. ',"p90":' .. latency:percentile(90)
      .. ',"p99":' .. latency:percentile(99) .. ',"p99_9":' .. latency:percentile(99.9) .. '}',
  }
  io.write("BENCH_JSON {" .. table.concat(parts, ",") .. "}\n")
end
