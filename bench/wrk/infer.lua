-- wrk script for bench/serving.py: POST the same KServe v2 inference request on every
-- request, then print wrk's figures as one JSON line that the benchmark reads.
--
--   wrk -s bench/wrk/infer.lua URL -- BODY_FILE [INFERENCE_HEADER_CONTENT_LENGTH]
--
-- With the second argument the body is a binary tensor extension request: a JSON header of
-- that many bytes followed by the raw tensor bytes. The body is read once per wrk thread and
-- wrk builds the request once, so the script costs nothing per request.

function init(args)
  local file = assert(io.open(args[1], "rb"))
  wrk.method = "POST"
  wrk.body = file:read("*a")
  file:close()
  if args[2] then
    wrk.headers["Content-Type"] = "application/octet-stream"
    wrk.headers["Inference-Header-Content-Length"] = args[2]
  else
    wrk.headers["Content-Type"] = "application/json"
  end
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "p50_us": %.1f, "p99_us": %.1f, ' ..
    '"mean_us": %.1f, "connect_errors": %d, "read_errors": %d, "write_errors": %d, ' ..
    '"status_errors": %d, "timeouts": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, errors.connect, errors.read, errors.write, errors.status, errors.timeout))
end
