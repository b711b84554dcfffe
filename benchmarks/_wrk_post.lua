-- wrk script of bench_serve.py: multipart POSTs of real image files, as `curl -F image=@FILE` sends them.
--
--   wrk -t1 -c16 -d10s --timeout 2s -s benchmarks/_wrk_post.lua http://127.0.0.1:PORT/v1/predict -- a.png b.png ...
--
-- The files after `--` are read once and cycled through. Every response is counted by status.
-- Environment: WRK_JSON (required) the file the summary is written to as JSON (latencies in
-- microseconds, as wrk records them: from a request's first byte written to its answer's last byte
-- read; the percentiles include wrk's own coordinated-omission correction, which only adds samples
-- to the tail); WRK_STOP_AFTER (optional) each thread stops after that many answers and creates
-- WRK_DONE_FILE, so the driver can end the run (SIGINT) before -d runs out.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

local function multipart(path)
   local f = assert(io.open(path, "rb"), "cannot read " .. path)
   local data = f:read("*a")
   f:close()
   local boundary = "----transferbench"
   local name = path:match("([^/]+)$")
   local body = "--" .. boundary .. "\r\n"
      .. 'Content-Disposition: form-data; name="image"; filename="' .. name .. '"\r\n'
      .. "Content-Type: image/png\r\n\r\n" .. data .. "\r\n--" .. boundary .. "--\r\n"
   return wrk.format("POST", nil, {["Content-Type"] = "multipart/form-data; boundary=" .. boundary}, body)
end

function init(args)
   reqs = {}
   for i = 1, #args do
      reqs[i] = multipart(args[i])
   end
   assert(#reqs > 0, "give the image files after --")
   sent = 0
   answered = 0
   statuses = {}
   stop_after = tonumber(os.getenv("WRK_STOP_AFTER") or "0")
end

function request()
   sent = sent + 1
   return reqs[(sent - 1) % #reqs + 1]
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
   answered = answered + 1
   if stop_after > 0 and answered == stop_after then
      local marker = os.getenv("WRK_DONE_FILE")
      if marker then
         io.open(marker, "w"):close()
      end
      wrk.thread:stop()
   end
end

function done(summary, latency, requests)
   local counts = {}
   for _, t in ipairs(threads) do
      for status, n in pairs(t:get("statuses") or {}) do
         counts[status] = (counts[status] or 0) + n
      end
   end
   local parts = {}
   for status, n in pairs(counts) do
      parts[#parts + 1] = string.format('"%d": %d', status, n)
   end
   local e = summary.errors
   local out = string.format(
      '{"requests": %d, "duration_us": %d, "bytes": %d, "statuses": {%s}, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"latency_us": {"min": %d, "mean": %.1f, "max": %d, "p50": %d, "p90": %d, "p99": %d, "p999": %d}}',
      summary.requests, summary.duration, summary.bytes, table.concat(parts, ", "),
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9))
   local f = assert(io.open(assert(os.getenv("WRK_JSON"), "set WRK_JSON"), "w"))
   f:write(out)
   f:close()
end
