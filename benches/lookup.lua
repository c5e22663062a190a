-- Single lookups over keep-alive: random numbers, a share of which were suppressed by the
-- delivery phase (thread 1 and 2 numbers +491 1/2 00000000..).
math.randomseed(os.time())
local paths = {}
function init(args)
  for i = 1, 10000 do
    local tag = math.random(1, 2)
    local n = tag * 100000000 + math.random(1, 200000)
    paths[i] = string.format("/v1/phones/%%2B491%010d", n % 10000000000)
  end
end
local i = 0
function request()
  i = i % 10000 + 1
  return wrk.format("GET", paths[i])
end

dofile("benches/percentiles.lua")
