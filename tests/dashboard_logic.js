// Unit tests of the dashboard's pure functions (the `logic` script of http/src/dashboard.html),
// run by tests/dashboard.rs inside the dashboard's own page in a real browser. The value of this
// expression is the list of failures: empty when every check holds.
(() => {
  const failures = [];
  const check = (what, got, want) => {
    const same = typeof want === "number" && typeof got === "number"
      ? Math.abs(got - want) < 1e-9 || (got === want)
      : JSON.stringify(got) === JSON.stringify(want);
    if (!same) failures.push(`${what}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  };

  // Prometheus text as the nodes write it (hand-written counters) and as metrics-exporter-prometheus
  // writes the latency histogram: two statuses of POST /v1/orders, a GET route, another method.
  const histogram = (c201, c402, get) => [
    "# HELP bulkhead_http_request_duration_seconds time to answer",
    "# TYPE bulkhead_http_request_duration_seconds histogram",
    ...["0.005", "0.01", "0.025", "0.05", "0.1", "+Inf"].flatMap((le, i) => [
      `bulkhead_http_request_duration_seconds_bucket{method="POST",route="/v1/orders",status="201",le="${le}"} ${c201[i]}`,
      `bulkhead_http_request_duration_seconds_bucket{method="POST",route="/v1/orders",status="402",le="${le}"} ${c402[i]}`,
      `bulkhead_http_request_duration_seconds_bucket{method="GET",route="/v1/orders/{id}",status="200",le="${le}"} ${get}`,
      `bulkhead_http_request_duration_seconds_bucket{method="PUT",route="/v1/orders",status="405",le="${le}"} ${get}`,
    ]),
    `bulkhead_http_request_duration_seconds_sum{method="POST",route="/v1/orders",status="201"} 1.25`,
    `bulkhead_http_request_duration_seconds_count{method="POST",route="/v1/orders",status="201"} ${c201[5]}`,
  ].join("\n");
  const counters = (placed, confirmed, pending, cancelled) => [
    "# HELP bulkhead_orders_placed_total POST /v1/orders accepted for processing by this node",
    "# TYPE bulkhead_orders_placed_total counter",
    `bulkhead_orders_placed_total ${placed}`,
    "",
    `bulkhead_orders_answered_total{outcome="confirmed"} ${confirmed}`,
    `bulkhead_orders_answered_total{outcome="pending"} ${pending}`,
    `bulkhead_orders_answered_total{outcome="cancelled"} ${cancelled}`,
    `bulkhead_raft_replication_lag{group="orders/0",node="n2"} 3`,
  ].join("\n");

  // The parser: names, labels (escapes included), values (+Inf, exponents), timestamps, comments.
  const parsed = parsePrometheus([
    "# a comment",
    "plain 42",
    `with_labels{a="x",b="y \\"quoted\\" back\\\\slash",c="line\\nbreak"} 1.5e3 1700000000000`,
    `empty_labels{} 7`,
    `spaced{ a = "1" , b="2" } +Inf`,
    `trailing_comma{a="1",} 3`,
    "broken{a=1} 9",
    "   ",
  ].join("\n"));
  check("parsed count", parsed.length, 5);
  check("plain", parsed[0], { name: "plain", labels: {}, value: 42 });
  check("labels", parsed[1].labels, { a: "x", b: 'y "quoted" back\\slash', c: "line\nbreak" });
  check("exponent value, timestamp ignored", parsed[1].value, 1500);
  check("empty labels", parsed[2], { name: "empty_labels", labels: {}, value: 7 });
  check("spaced labels", parsed[3].labels, { a: "1", b: "2" });
  check("+Inf", parsed[3].value, Infinity);
  check("trailing comma", parsed[4], { name: "trailing_comma", labels: { a: "1" }, value: 3 });

  // Counters.
  const c = parsePrometheus(counters(10, 7, 1, 2));
  check("placed", sumOf(c, "bulkhead_orders_placed_total"), 10);
  check("confirmed", sumOf(c, "bulkhead_orders_answered_total", { outcome: "confirmed" }), 7);
  check("all answers", sumOf(c, "bulkhead_orders_answered_total"), 10);
  check("absent", sumOf(c, "bulkhead_nothing_total"), null);
  check("rate", ratePerSecond(25, 10, 2000), 7.5);
  check("rate after a restart", ratePerSecond(3, 10, 1000), null);
  check("rate unknown", ratePerSecond(null, 10, 1000), null);

  // The histogram: only POST /v1/orders, statuses summed, by le.
  check("no histogram", orderLatencyBuckets(c), null);
  const older = orderLatencyBuckets(parsePrometheus(histogram([10, 20, 30, 40, 50, 50], [0, 0, 1, 1, 1, 1], 999)));
  check("buckets", older, [
    { le: 0.005, count: 10 }, { le: 0.01, count: 20 }, { le: 0.025, count: 31 },
    { le: 0.05, count: 41 }, { le: 0.1, count: 51 }, { le: Infinity, count: 51 },
  ]);
  // 102 more answers: 50 within 5 ms, 90 within 10 ms, 97 within 25 ms, 101 within 50 ms, all within 100 ms.
  const newer = orderLatencyBuckets(parsePrometheus(histogram([55, 100, 125, 140, 150, 150], [5, 10, 3, 2, 3, 3], 5)));
  const delta = bucketDelta(newer, older);
  check("delta", delta.map((b) => b.count), [50, 90, 97, 101, 102, 102]);
  // rank 0.99 × 102 = 100.98 falls in (25 ms, 50 ms]: 25 + 25 × (100.98 − 97) / (101 − 97) ms.
  check("p99 of the delta", quantile(0.99, delta) * 1000, 25 + 25 * 3.98 / 4);
  // rank 51 falls in (5 ms, 10 ms]: 5 + 5 × (51 − 50) / (90 − 50) ms.
  check("p50 of the delta", quantile(0.5, delta) * 1000, 5 + 5 / 40);
  check("counter reset", bucketDelta(older, newer), null);
  check("nothing happened", quantile(0.99, bucketDelta(older, older)), null);
  check("p99 in the +Inf bucket is the highest bound",
    quantile(0.99, [{ le: 0.1, count: 1 }, { le: Infinity, count: 100 }]), 0.1);
  check("different buckets", bucketDelta(newer, newer.slice(1)), null);
  check("no histogram before the first order", quantile(0.99, bucketDelta(newer, null)), quantile(0.99, newer));
  check("no histogram at all", bucketDelta(null, null), null);

  // Readings to series: rates per second, p99 per reading over the span before it, the window's p99.
  // 51 answers, rank 50.49 in (50 ms, 100 ms]: 50 + 50 × (50.49 − 41) / (51 − 41) = 97.45 ms.
  const text = (placed, h) => counters(placed, placed, 0, 0) + "\n" + h;
  const r0 = reading(0, parsePrometheus(text(0, histogram([0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], 0))));
  const r1 = reading(1000, parsePrometheus(text(4, histogram([10, 20, 30, 40, 50, 50], [0, 0, 1, 1, 1, 1], 0))));
  const r2 = reading(3000, parsePrometheus(text(10, histogram([10, 20, 30, 40, 50, 50], [0, 0, 1, 1, 1, 1], 0))));
  const s = series([r0, r1, r2]);
  check("series times", s.t, [1000, 3000]);
  check("placed/s", s.placed, [4, 3]);
  check("p99 per reading", s.p99.map((v) => v === null ? null : Math.round(v * 1000) / 1000), [97.45, 97.45]);
  check("p99 of a quiet span", series([r1, r2], 1000).p99, [null]);
  check("placed/s over the last 10 s", recentRate([r0, r1, r2], "placed", 10000), 10 / 3);
  check("placed/s over the last 2 s", recentRate([r0, r1, r2], "placed", 2000), 3);
  check("no rate from one reading", recentRate([r2], "placed", 10000), null);
  check("window p99", Math.round(windowP99([r0, r1, r2]) * 1000) / 1000, 97.45);
  const bare = reading(0, c);
  check("no histogram: no p99", windowP99([bare, bare]), null);
  check("no histogram: series", series([bare, bare]).p99, [null]);

  // Leader changes: first sight is no change; an election gap is not one either.
  const sh = (leader, term) => [{ capability: "orders", shard: 1, leader, term }];
  let k = leaderChanges(new Map(), sh("n3", 1), 0);
  check("first sight", k.events, []);
  k = leaderChanges(k.known, sh(null, 2), 1);
  check("electing", k.events, []);
  k = leaderChanges(k.known, sh("n1", 2), 2);
  check("failover", k.events, [{ t: 2, group: "orders/1", from: "n3", to: "n1", term: 2 }]);
  k = leaderChanges(k.known, sh("n1", 2), 3);
  check("steady", k.events, []);

  // The token in the fragment.
  check("token", tokenFromHash("#token=abc%2Bdef"), { token: "abc+def", rest: "" });
  check("token and more", tokenFromHash("#x=1&token=t"), { token: "t", rest: "#x=1" });
  check("no token", tokenFromHash(""), { token: null, rest: "" });

  check("fmt", [fmt(null), fmt(0), fmt(0.5), fmt(7.25), fmt(42.42), fmt(420.4)], ["—", "0", "0.50", "7.3", "42.4", "420"]);
  return failures;
})()
