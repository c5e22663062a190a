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

function request()
  counter = counter + 1
  local n = tag * 100000000 + counter
  local id = string.format("%08x-0000-4000-8000-%012x", tag, counter)
  local phone = string.format("+491%010d", n % 10000000000)
  local body = string.format('{"id":"%s","name":"phone.unsubscribe","created_at":1757849748,' ..
    '"api_version":"2022-05-25","attempt_number":1,"attempts_total":4,"data":{"phone":"%s",' ..
    '"user_id":2,"created_at":1757849748,"campaign_code":"3KCKb5nMD","additional_data":{"reason":' ..
    '{"id":4,"label":"Es ist unverständlich"},"additional_text":"zusätzlicher Benutzertext"},' ..
    '"short_link_code":"baaIou","unsubscribe_request_id":59}}', id, phone)
  return wrk.format("POST", "/webhooks/lox24", nil, body)
end

function response(status, headers, body)
  if status ~= 200 then
    io.stderr:write("unexpected status " .. status .. ": " .. body .. "\n")
  end
end
