-- Shared by the wrk scripts: prints the latency percentiles wrk's --latency leaves out, on one
-- line that benches/soak.sh reads.
function done(summary, latency, requests)
  io.write(string.format("percentiles: p50 %.2f ms, p99 %.2f ms, p99.9 %.2f ms, max %.2f ms\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency:percentile(99.9) / 1000, latency.max / 1000))
end
