-- Single lookups over keep-alive. A fixed share of them (SUPPRESSED_SHARE, default 0.5) asks for
-- numbers the benchmark loaded as suppressed beforehand (SUPPRESSED_COUNT numbers from
-- +491 followed by SUPPRESSED_BASE + 1, + 2, … as ten digits), the rest for numbers nobody ever
-- sent, so the mix does not depend on how many deliveries an earlier phase managed. A suppressed
-- answer costs a database read and carries the reasons; a clean one comes from memory.
local share = tonumber(os.getenv("SUPPRESSED_SHARE") or "0.5")
local base = tonumber(os.getenv("SUPPRESSED_BASE") or "600000000")
local count = tonumber(os.getenv("SUPPRESSED_COUNT") or "1000000")
local unseen_base = 900000000
local paths = {}
function init(args)
  math.randomseed(os.time())
  for i = 1, 10000 do
    local n
    if math.random() < share then
      n = base + math.random(1, count)
    else
      n = unseen_base + math.random(1, 10000000)
    end
    paths[i] = string.format("/v1/phones/%%2B491%010d", n)
  end
end
local i = 0
function request()
  i = i % 10000 + 1
  return wrk.format("GET", paths[i])
end

dofile("benches/percentiles.lua")
