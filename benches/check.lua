-- Bulk checks: 10,000 numbers per POST /v1/check.
function init(args)
  local numbers = {}
  for i = 1, 10000 do
    local tag = (i % 2) + 1
    numbers[i] = string.format('"+491%010d"', (tag * 100000000 + i * 7) % 10000000000)
  end
  wrk.method = "POST"
  wrk.body = '{"phones":[' .. table.concat(numbers, ",") .. ']}'
  wrk.headers["Content-Type"] = "application/json"
end

dofile("benches/percentiles.lua")
