// The TanStack Query adapter with a real @tanstack/query-core QueryClient and a real HTTP server.
import assert from "node:assert/strict";
import { test } from "node:test";
import { QueryClient, QueryObserver } from "@tanstack/query-core";
import { createClient } from "../src/index.js";
import { aggregateQuery, aggregateStats, connectQueryClient, hashKey, keysFor, toKeys } from "../src/tanstack-query.js";
import { beginStream, frame, sseServer, until } from "./helpers.js";

const MAP = {
  "bill.status.changed": [["bills"], ["bill-stats"]],
  "bill.created": ["bills"],
  "auction.item.*": (e) => [["sessions", { id: e.data.session_id }]],
  "noop.*": () => null,
};

test("the invalidation map: exact types, one key or a list, wildcards, functions", () => {
  const ev = (type, data = {}) => ({ id: "1", type, topic: "t", data });
  assert.deepEqual(keysFor(MAP, ev("bill.status.changed")), [["bills"], ["bill-stats"]]);
  assert.deepEqual(keysFor(MAP, ev("bill.created")), [["bills"]]);
  assert.deepEqual(keysFor(MAP, ev("auction.item.sold", { session_id: 4 })), [["sessions", { id: 4 }]]);
  assert.deepEqual(keysFor(MAP, ev("noop.x")), []);
  assert.deepEqual(keysFor(MAP, ev("bill.statusXchanged")), []);
  assert.deepEqual(toKeys([]), [[]]);
  assert.equal(hashKey(["s", { a: 1, b: 2 }]), hashKey(["s", { b: 2, a: 1 }]));
});

function observe(queryClient, queryKey, counts) {
  counts[hashKey(queryKey)] = 0;
  const observer = new QueryObserver(queryClient, {
    queryKey, staleTime: Infinity,
    queryFn: async () => { counts[hashKey(queryKey)] += 1; return counts[hashKey(queryKey)]; },
  });
  return observer.subscribe(() => {});
}

test("a burst or replay collapses into one refetch per distinct key; unmapped queries are left alone; reset refetches all", async (t) => {
  let stream;
  const server = await sseServer((req, res) => { beginStream(res); stream = res; });
  t.after(() => server.close());
  const rt = createClient({ url: server.url });
  t.after(() => rt.close());
  const queryClient = new QueryClient();
  t.after(() => queryClient.clear());
  const counts = {};
  const keys = [["bills"], ["bills", 7], ["bill-stats"], ["sessions", { id: 4 }], ["sessions", { id: 5 }], ["other"]];
  const unsubscribe = keys.map((key) => observe(queryClient, key, counts));
  t.after(() => unsubscribe.forEach((off) => off()));
  await until(() => Object.values(counts).every((n) => n === 1), 3000, "first fetches");
  const resets = [];
  const invalidations = [];
  const original = queryClient.invalidateQueries.bind(queryClient);
  queryClient.invalidateQueries = (filters) => { invalidations.push(filters ? hashKey(filters.queryKey) : "*"); return original(filters); };
  const stop = connectQueryClient(rt, queryClient, { topics: ["bills", "auctions"], map: MAP, batchMs: 30, onReset: (e) => resets.push(e.data.reason) });
  t.after(stop);
  await until(() => stream, 3000, "stream");
  let id = 0;
  for (let i = 0; i < 20; i++) stream.write(frame({ id: ++id, type: "bill.status.changed", topic: "bills/7", data: {} }));
  stream.write(frame({ id: ++id, type: "auction.item.bid", topic: "auctions/1", data: { session_id: 4 } }));
  stream.write(frame({ id: ++id, type: "unmapped.thing", topic: "bills/7", data: {} }));
  await until(() => counts[hashKey(["sessions", { id: 4 }])] === 2, 3000, "refetch");
  await new Promise((resolve) => setTimeout(resolve, 100));
  assert.deepEqual(invalidations.sort(), [hashKey(["bill-stats"]), hashKey(["bills"]), hashKey(["sessions", { id: 4 }])].sort());
  assert.equal(counts[hashKey(["bills"])], 2);
  assert.equal(counts[hashKey(["bills", 7])], 2, "prefix match, as TanStack does");
  assert.equal(counts[hashKey(["bill-stats"])], 2);
  assert.equal(counts[hashKey(["sessions", { id: 5 }])], 1, "other parameters untouched");
  assert.equal(counts[hashKey(["other"])], 1, "unmapped query untouched");
  stream.write(frame({ id: ++id, type: "reset", topic: null, data: { reason: "history_expired" } }));
  await until(() => counts[hashKey(["other"])] === 2, 3000, "reset refetches everything");
  assert.deepEqual(resets, ["history_expired"]);
  assert.equal(invalidations.at(-1), "*");
});

test("aggregateQuery: If-None-Match makes a refetch a 304; aggregate.invalidated refreshes it; degraded → adaptive polling", async (t) => {
  let version = 1;
  const seen = [];
  let stream;
  const server = await sseServer((req, res, n, entry) => {
    if (entry.url.pathname === "/events") { beginStream(res); stream = res; return; }
    const etag = `W/"v${version}"`;
    seen.push({ path: entry.url.pathname + entry.url.search, inm: req.headers["if-none-match"] || null });
    if (req.headers["if-none-match"] === etag) { res.writeHead(304, { ETag: etag }); res.end(); return; }
    res.writeHead(200, { "Content-Type": "application/json", ETag: etag });
    res.end(JSON.stringify({ data: [{ v: version }], meta: { position: 10 * version } }));
  });
  t.after(() => server.close());
  const rt = createClient({ url: server.url });
  t.after(() => rt.close());
  const queryClient = new QueryClient();
  t.after(() => queryClient.clear());
  const options = aggregateQuery(rt, "daily_sales", { store_id: 2, since: null });
  assert.deepEqual(options.queryKey, ["pgsse", "aggregate", "daily_sales", { store_id: 2, since: null }]);
  const results = [];
  const observer = new QueryObserver(queryClient, { ...options, staleTime: Infinity });
  t.after(observer.subscribe((r) => { if (r.data) results.push(r.data.data[0].v); }));
  await until(() => results.length === 1, 3000, "first fetch");
  assert.equal(rt.lastEventId, "10", "the snapshot's position seeds the stream");
  const stop = connectQueryClient(rt, queryClient, { batchMs: 10 });
  t.after(stop);
  await until(() => stream, 3000, "aggregates/daily_sales stream");
  const events = server.requests.filter((r) => r.url.pathname === "/events");
  assert.ok(events.at(-1).topics.includes("aggregates/daily_sales"));
  assert.equal(events.at(-1).lastEventId, "10");
  await queryClient.refetchQueries({ queryKey: ["pgsse", "aggregate", "daily_sales"] });
  assert.deepEqual(seen.map((s) => s.inm), [null, 'W/"v1"']);
  version = 2;
  stream.write(frame({ type: "aggregate.invalidated", topic: "aggregates/daily_sales", data: { aggregate: "daily_sales" } }));
  await until(() => results.at(-1) === 2, 3000, "refreshed by aggregate.invalidated");
  assert.equal(seen.at(-1).path, "/aggregates/daily_sales?store_id=2&min_position=10");
  assert.deepEqual(aggregateStats(rt), { requests: 3, notModified: 1, changed: 2 });
  assert.equal(options.refetchInterval(), false, "no polling while the stream holds");
  rt.degraded = true;
  assert.equal(options.refetchInterval(), 3000);
  await queryClient.refetchQueries({ queryKey: ["pgsse", "aggregate", "daily_sales"] }); // 304
  assert.equal(options.refetchInterval(), 4500, "unchanged answers slow the polling down");
});
