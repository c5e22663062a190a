-- Single lookups for benches/compare.sh, in the keyspace redis-benchmark uses: `+49` and twelve
-- digits drawn from 0 .. 2 × COMPARE_COUNT, of which the first COMPARE_COUNT were loaded as
-- suppressed, so about half of the lookups are hits, as `-r 2×COUNT` makes them for Redis.
local count = tonumber(os.getenv("COMPARE_COUNT") or "1000000")
local paths = {}
function init(args)
  math.randomseed(os.time())
  for i = 1, 10000 do
    paths[i] = string.format("/v1/phones/%%2B49%012d", math.random(0, 2 * count - 1))
  end
end
local i = 0
function request()
  i = i % 10000 + 1
  return wrk.format("GET", paths[i])
end

dofile("benches/percentiles.lua")
