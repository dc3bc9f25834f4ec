-- wrk script: POST /v1/query (or /sql) point selects by primary key, a random aid per request.
--
--   wrk -t2 -c32 -d10s -s bench/wrk/point_select.lua http://127.0.0.1:8080 -- 10
--
-- The argument after "--" is pgbench's scale: aid is uniform in 1..scale*100000; a
-- second one replaces the SQL; a third is a bearer token every request carries, or
-- "neon", which sends the point select to POST /sql as @neondatabase/serverless does
-- (its headers, the parameter as a string; bench/neon.py).
-- done() prints one line "RESULT {json}" with the counts and latency percentiles
-- (microseconds). "non2xx" is wrk's own count of answers with status >= 400 (wrk
-- counts no other non-2xx status; a point select gets no 1xx or 3xx), "socket_errors"
-- adds connect, read, write errors and timeouts. A run with either non-zero is not a
-- valid figure.

local sql = "SELECT aid, abalance FROM pgbench_accounts WHERE aid = $1"
local max_aid = 10 * 100000
local counter = 0
local path = "/v1/query"
local suffix = "]}"

function setup(thread)
   counter = counter + 1
   thread:set("thread_id", counter)
end

function init(args)
   if args[1] ~= nil then
      max_aid = tonumber(args[1]) * 100000
   end
   if args[2] ~= nil then
      sql = args[2]
   end
   if args[3] ~= nil and args[3] ~= "neon" then
      wrk.headers["Authorization"] = "Bearer " .. args[3]
   end
   math.randomseed(os.time() * 1000 + (thread_id or 0) * 7919)
   for _ = 1, 10 do math.random() end  -- the first draws after seeding are poor
   wrk.method = "POST"
   if args[3] == "neon" then
      path = "/sql"
      wrk.headers["Content-Type"] = "text/plain;charset=UTF-8"  -- fetch's for a string body
      wrk.headers["Neon-Connection-String"] = "postgresql://bench:bench@127.0.0.1/bench"
      wrk.headers["Neon-Raw-Text-Output"] = "true"
      wrk.headers["Neon-Array-Mode"] = "true"
      prefix = '{"query":"' .. sql .. '","params":["'
      suffix = '"]}'
   else
      wrk.headers["Content-Type"] = "application/json"
      prefix = '{"sql":"' .. sql .. '","params":['
   end
end

function request()
   return wrk.format(nil, path, nil, prefix .. math.random(1, max_aid) .. suffix)
end

function done(summary, latency, requests)
   local e = summary.errors
   local out = {
      string.format('"requests":%d', summary.requests),
      string.format('"duration_us":%d', summary.duration),
      string.format('"bytes":%d', summary.bytes),
      string.format('"non2xx":%d', e.status),
      string.format('"socket_errors":%d', e.connect + e.read + e.write + e.timeout),
      string.format('"connect_errors":%d', e.connect),
      string.format('"read_errors":%d', e.read),
      string.format('"write_errors":%d', e.write),
      string.format('"timeouts":%d', e.timeout),
      string.format('"latency_mean_us":%.1f', latency.mean),
      string.format('"latency_max_us":%d', latency.max),
   }
   for _, p in ipairs({50, 90, 99, 99.9}) do
      out[#out + 1] = string.format('"p%s_us":%d', tostring(p):gsub("%.", "_"), latency:percentile(p))
   end
   io.write("RESULT {" .. table.concat(out, ",") .. "}\n")
end
