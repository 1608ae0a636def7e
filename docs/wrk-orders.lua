-- wrk script: POST /v1/orders with a unique Idempotency-Key per request, over the SKUs the
-- benchmark seeds (bench-0 .. bench-63). Counts only 201 (confirmed) as success.
-- Usage: wrk -t2 -c64 -d15s -s docs/wrk-orders.lua http://127.0.0.1:8080
local counter = 0
local thread_id = 0
local confirmed = 0
local others = 0

function setup(thread)
  thread:set("id", thread_id)
  thread_id = thread_id + 1
end

function init(args)
  prefix = "wrk-" .. os.time() .. "-" .. id .. "-"
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"customer_id":"wrk","items":[{"sku":"bench-%d","quantity":1}],"payment_token":"tok_ok"}',
    counter % 64)
  local headers = { ["Content-Type"] = "application/json", ["Idempotency-Key"] = prefix .. counter }
  return wrk.format("POST", "/v1/orders", headers, body)
end

function response(status, headers, body)
  if status == 201 then confirmed = confirmed + 1 else others = others + 1 end
end

function done(summary, latency, requests)
  io.write(string.format("non-2xx or non-201 responses are in wrk's own summary; requests/s above counts every answer\n"))
end
