-- Durable LOX24 deliveries: every request is a new event (unique id) for a new phone number,
-- so each one is a real write that must be flushed before its 200.
local counter = 0
local thread_tag = 0

function setup(thread)
  thread_tag = thread_tag + 1
  thread:set("tag", thread_tag)
end

function init(args)
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_SECRET")
  wrk.headers["Content-Type"] = "application/json"
end

-- RETRY_EVERY=n resends every n-th request's body unchanged, as a provider's retry would: it
-- must be answered 200 ("duplicate") and change nothing.
local retry_every = tonumber(os.getenv("RETRY_EVERY") or "0")
local last = nil

function request()
  if retry_every > 0 and last ~= nil and counter % retry_every == 0 then
    local again = last
    last = nil
    return again
  end
  counter = counter + 1
  local n = tag * 100000000 + counter
  local id = string.format("%08x-0000-4000-8000-%012x", tag, counter)
  local phone = string.format("+491%010d", n % 10000000000)
  local body = string.format('{"id":"%s","name":"phone.unsubscribe","created_at":1757849748,' ..
    '"api_version":"2022-05-25","attempt_number":1,"attempts_total":4,"data":{"phone":"%s",' ..
    '"user_id":2,"created_at":1757849748,"campaign_code":"3KCKb5nMD","additional_data":{"reason":' ..
    '{"id":4,"label":"Es ist unverständlich"},"additional_text":"zusätzlicher Benutzertext"},' ..
    '"short_link_code":"baaIou","unsubscribe_request_id":59}}', id, phone)
  last = wrk.format("POST", "/webhooks/lox24", nil, body)
  return last
end

function response(status, headers, body)
  if status ~= 200 then
    io.stderr:write("unexpected status " .. status .. ": " .. body .. "\n")
  end
end

dofile("benches/percentiles.lua")
