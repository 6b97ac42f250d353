// The client against a real HTTP server on 127.0.0.1 that plays pgsse's part per test.
import assert from "node:assert/strict";
import { test } from "node:test";
import { createClient } from "../src/index.js";
import { beginStream, frame, sseServer, until } from "./helpers.js";

const fast = { initialMs: 20, maxMs: 200, minMs: 5 };

test("subscribe, unsubscribe, subscribe in one tick (StrictMode) opens one connection", async (t) => {
  const server = await sseServer((req, res) => beginStream(res));
  t.after(() => server.close());
  const rt = createClient({ url: server.url, backoff: fast });
  t.after(() => rt.close());
  const off = rt.subscribe(["orders/1"], () => {});
  off();
  const off2 = rt.subscribe(["orders/1"], () => {});
  const off3 = rt.subscribe(["payouts/1"], () => {});
  off3();
  rt.subscribe(["payouts/1"], () => {});
  await until(() => rt.status === "open", 3000, "open");
  await new Promise((resolve) => setTimeout(resolve, 80));
  assert.equal(server.requests.length, 1);
  assert.deepEqual(server.requests[0].topics, ["orders/1", "payouts/1"]);
  assert.equal(server.requests[0].url.searchParams.get("envelope"), "1");
  off2();
});

test("five subscriptions share one connection; a new topic reconnects once from the last id", async (t) => {
  const server = await sseServer((req, res, n) => {
    beginStream(res);
    if (n === 0) res.write(frame({ id: 41, type: "orders.insert", topic: "orders/1", data: { n: 1 } }));
  });
  t.after(() => server.close());
  const rt = createClient({ url: server.url, backoff: fast });
  t.after(() => rt.close());
  const got = [];
  for (const topic of ["orders/1", "orders/1", "orders", "payouts/1", "orders/1/lines"]) {
    rt.subscribe([topic], (e) => got.push([topic, e.id]));
  }
  await until(() => rt.lastEventId === "41", 3000, "first event");
  assert.equal(server.requests.length, 1);
  // orders/1 (twice), orders and orders/1/lines? No: orders/1/lines does not cover orders/1.
  assert.deepEqual(got.map((g) => g[0]).sort(), ["orders", "orders/1", "orders/1"]);
  rt.subscribe(["stock"], () => {});
  rt.subscribe(["stock/9"], () => {});
  await until(() => server.requests.length === 2, 3000, "reconnect");
  await new Promise((resolve) => setTimeout(resolve, 60));
  assert.equal(server.requests.length, 2);
  assert.equal(server.requests[1].lastEventId, "41");
  assert.deepEqual(server.requests[1].topics, ["orders", "orders/1", "orders/1/lines", "payouts/1", "stock", "stock/9"]);
});

test("events reach the subscriptions whose topics and type filters match, once each", async (t) => {
  let stream;
  const server = await sseServer((req, res) => { beginStream(res); stream = res; });
  t.after(() => server.close());
  const rt = createClient({ url: server.url });
  t.after(() => rt.close());
  const bills = [];
  const all = [];
  rt.subscribe(["bills"], (e) => bills.push(e.type), { types: ["bill.*"] });
  rt.subscribe(["bills/7", "aggregates/bill_stats"], (e) => all.push(e.type + "@" + e.topic));
  await until(() => stream, 3000, "stream");
  stream.write(frame({ id: 1, type: "bill.status.changed", topic: "bills/7", data: { id: 7 } }));
  stream.write(frame({ id: 2, type: "bills.insert", topic: "bills/8", data: {} }));
  stream.write(frame({ id: 2, type: "bill.status.changed", topic: "bills/7", data: {} })); // duplicate id
  stream.write(frame({ id: 1, type: "bill.status.changed", topic: "bills/7", data: {} })); // older id
  stream.write(frame({ type: "aggregate.invalidated", topic: "aggregates/bill_stats", data: { aggregate: "bill_stats" } }));
  stream.write(frame({ id: 3, type: "bill.paid", topic: "bills/9", data: {} }));
  await until(() => bills.length === 2, 3000, "bills");
  assert.deepEqual(bills, ["bill.status.changed", "bill.paid"]);
  assert.deepEqual(all, ["bill.status.changed@bills/7", "aggregate.invalidated@aggregates/bill_stats"]);
  assert.equal(rt.lastEventId, "3", "aggregate.invalidated (no id) never moves the position");
});

test("a TRUNCATE on a keyed table's topic reaches the subscriptions below it", async (t) => {
  let stream;
  const server = await sseServer((req, res) => { beginStream(res); stream = res; });
  t.after(() => server.close());
  const rt = createClient({ url: server.url });
  t.after(() => rt.close());
  const seven = [];
  const other = [];
  rt.subscribe(["big/7"], (e) => seven.push(e.type));
  rt.subscribe(["bigger/7"], (e) => other.push(e.type));
  await until(() => stream, 3000, "stream");
  stream.write(frame({ id: 1, type: "big.insert", topic: "big/8", data: { op: "insert" } }));
  stream.write(frame({ id: 2, type: "big.truncate", topic: "big", data: { op: "truncate", table: "public.big" } }));
  stream.write(frame({ id: 3, type: "bigger.insert", topic: "bigger/7", data: { op: "insert" } }));
  await until(() => other.length === 1, 3000, "bigger");
  assert.deepEqual(seven, ["big.truncate"]);
  assert.deepEqual(other, ["bigger.insert"]);
});

test("reset goes to the app and to every subscription; the client continues from its id", async (t) => {
  const server = await sseServer((req, res, n) => {
    beginStream(res, 10);
    if (n === 0) {
      res.write(frame({ id: 100, type: "reset", topic: null, data: { reason: "history_expired" } }));
      res.end();
    }
  });
  t.after(() => server.close());
  const rt = createClient({ url: server.url, since: 5, backoff: fast });
  t.after(() => rt.close());
  const resets = [];
  const seen = [];
  rt.on("reset", (e) => resets.push(e.data.reason));
  rt.subscribe(["x"], (e) => seen.push(e.type));
  await until(() => server.requests.length === 2, 3000, "reconnect");
  assert.equal(server.requests[0].lastEventId, "5");
  assert.equal(server.requests[1].lastEventId, "100");
  assert.deepEqual(resets, ["history_expired"]);
  assert.deepEqual(seen, ["reset"]);
});

test("5xx, wrong content type and cut streams back off with jitter; the step resets after delivery", async (t) => {
  const answers = [
    (res) => { res.writeHead(502); res.end("bad gateway"); },
    (res) => { res.writeHead(200, { "Content-Type": "text/html" }); res.end("<html>"); },
    (res) => { res.writeHead(503, { "Retry-After": "1" }); res.end(); },
    (res) => { beginStream(res); res.write(frame({ id: 9, type: "t", topic: "x", data: 1 })); res.end(); },
    (res) => beginStream(res),
  ];
  const server = await sseServer((req, res, n) => answers[Math.min(n, answers.length - 1)](res));
  t.after(() => server.close());
  const statuses = [];
  const rt = createClient({ url: server.url, backoff: { initialMs: 100, maxMs: 400, minMs: 5, random: () => 1 } });
  t.after(() => rt.close());
  rt.on("status", (s, info) => statuses.push([s, info.delayMs]));
  rt.subscribe(["x"], () => {});
  await until(() => server.requests.length === 5, 5000, "five attempts");
  const backoffs = statuses.filter(([s]) => s === "backoff").map(([, d]) => d);
  // 100, 200, then Retry-After 1 s as a floor, then (after a delivered event) 100 again.
  assert.deepEqual(backoffs, [100, 200, 1000, 100]);
  const gaps = server.requests.slice(1).map((r, i) => r.at - server.requests[i].at);
  assert.ok(gaps[2] >= 990, `Retry-After honoured: ${gaps}`);
  assert.equal(server.requests[4].lastEventId, "9");
  await until(() => rt.status === "open", 3000, "open");
});

test("a stream's retry: floors the reconnect after it; after three failures the client says it is degraded", async (t) => {
  const server = await sseServer((req, res, n) => {
    if (n === 0) { beginStream(res, 150); res.end(); return; }
    res.destroy();
  });
  t.after(() => server.close());
  const rt = createClient({ url: server.url, backoff: { initialMs: 10, maxMs: 20, minMs: 1, random: () => 0 } });
  t.after(() => rt.close());
  const infos = [];
  rt.on("status", (s, info) => infos.push({ s, ...info }));
  rt.subscribe(["x"], () => {});
  await until(() => server.requests.length >= 4, 5000, "attempts");
  const delays = infos.filter((i) => i.s === "backoff").map((i) => i.delayMs);
  assert.equal(delays[0], 150, `retry: floor: ${delays}`);
  assert.ok(delays.slice(1).every((d) => d < 150), `later failures carry no retry: ${delays}`);
  await until(() => rt.degraded, 3000, "degraded");
});

test("401 fetches a fresh token at once; a getToken that keeps failing → unauthorized with backoff", async (t) => {
  const server = await sseServer((req, res) => {
    if (req.headers.authorization === "Bearer good-2") return beginStream(res);
    res.writeHead(401, { "Content-Type": "application/json" });
    res.end(JSON.stringify({ error: { code: "unauthorized", message: "expired" } }));
  });
  t.after(() => server.close());
  let calls = 0;
  const rt = createClient({ url: server.url, getToken: async () => `good-${++calls}`, backoff: fast });
  t.after(() => rt.close());
  rt.subscribe(["x"], () => {});
  await until(() => rt.status === "open", 3000, "open");
  assert.equal(calls, 2);
  assert.equal(server.requests.length, 2);

  let failing = 0;
  const statuses = [];
  const rt2 = createClient({ url: server.url, backoff: fast,
    getToken: async () => { failing += 1; throw new Error("login service down"); } });
  t.after(() => rt2.close());
  rt2.on("status", (s) => statuses.push(s));
  rt2.subscribe(["x"], () => {});
  await until(() => failing >= 3, 3000, "three getToken calls");
  assert.ok(statuses.filter((s) => s === "unauthorized").length >= 2);
  assert.ok(!statuses.includes("open"));
});

test("auth_expired: close, new token, resume from the last id", async (t) => {
  const server = await sseServer((req, res, n) => {
    beginStream(res);
    if (n === 0) {
      res.write(frame({ id: 7, type: "t", topic: "x", data: 1 }));
      res.write("event: auth_expired\ndata: {\"topic\":null,\"data\":{}}\n\n");
    }
  });
  t.after(() => server.close());
  const tokens = [];
  const rt = createClient({ url: server.url, getToken: async () => { tokens.push(tokens.length); return "t" + tokens.length; } });
  t.after(() => rt.close());
  rt.subscribe(["x"], () => {});
  await until(() => server.requests.length === 2 && rt.status === "open", 3000, "resumed");
  assert.equal(tokens.length, 2);
  assert.equal(server.requests[1].lastEventId, "7");
  assert.equal(server.requests[1].headers.authorization, "Bearer t2");
});

test("a 403 naming topics reaches those subscriptions only; the others keep streaming", async (t) => {
  let live;
  const server = await sseServer((req, res, n, entry) => {
    if (entry.topics.includes("secret")) {
      res.writeHead(403, { "Content-Type": "application/json" });
      res.end(JSON.stringify({ error: { code: "forbidden", message: "not granted", topics: ["secret"] } }));
      return;
    }
    beginStream(res);
    live = res;
  });
  t.after(() => server.close());
  const rt = createClient({ url: server.url });
  t.after(() => rt.close());
  const errors = { a: [], b: [] };
  const got = [];
  rt.subscribe(["public"], (e) => got.push(e.id), { onError: (e) => errors.a.push(e) });
  rt.subscribe(["secret"], () => {}, { onError: (e) => errors.b.push(e) });
  await until(() => live, 3000, "stream without the denied topic");
  assert.deepEqual(server.requests.at(-1).topics, ["public"]);
  live.write(frame({ id: 3, type: "t", topic: "public", data: {} }));
  await until(() => got.length === 1, 3000, "event");
  assert.equal(errors.a.length, 0);
  assert.equal(errors.b.length, 1);
  assert.deepEqual(errors.b[0].topics, ["secret"]);
  assert.equal(errors.b[0].status, 403);
});

// A JWT as the server reads it (the test servers do not check signatures).
const jwtFor = (claims) => ["e30", Buffer.from(JSON.stringify(claims)).toString("base64url"), "sig"].join(".");
const grants = (req) => {
  const token = (req.headers.authorization || "").replace(/^Bearer /, "");
  return JSON.parse(Buffer.from(token.split(".")[1] || "", "base64url").toString() || "{}").topics || [];
};

/** A server that answers 403 (naming them) for topics the request's token does not grant;
 * `streams.live` is the last stream it opened. */
async function grantingServer(t) {
  const streams = { live: undefined };
  const server = await sseServer((req, res, n, entry) => {
    const refused = entry.topics.filter((topic) => !grants(req).includes(topic));
    if (refused.length > 0) {
      res.writeHead(403, { "Content-Type": "application/json" });
      res.end(JSON.stringify({ error: { code: "forbidden", message: "not granted", topics: refused } }));
      return;
    }
    beginStream(res);
    streams.live = res;
  });
  t.after(() => server.close());
  return { server, streams };
}

test("a fresh token for the same grant does not ask for refused topics again", async (t) => {
  const { server, streams } = await grantingServer(t);
  let minted = 0; // every call mints a new token (its exp moves), granting the same topics
  const rt = createClient({ url: server.url, getToken: async () => jwtFor({ topics: ["public"], exp: 2e9 + ++minted }) });
  t.after(() => rt.close());
  const errors = [];
  rt.subscribe(["public"], () => {});
  rt.subscribe(["secret"], () => {}, { onError: (e) => errors.push(e.topics) });
  await until(() => streams.live, 3000, "stream without the denied topic");
  await new Promise((resolve) => setTimeout(resolve, 100));
  assert.deepEqual(errors, [["secret"]], "one 403, reported once");
  assert.deepEqual(server.requests.map((r) => r.topics), [["public", "secret"], ["public"]]);
});

test("a token with a new grant asks for refused topics again", async (t) => {
  const { server, streams } = await grantingServer(t);
  let topics = ["public"];
  const rt = createClient({ url: server.url, getToken: async () => jwtFor({ topics }) });
  t.after(() => rt.close());
  rt.subscribe(["public", "secret"], () => {});
  await until(() => streams.live, 3000, "stream without the denied topic");
  assert.deepEqual(server.requests.at(-1).topics, ["public"]);
  topics = ["public", "secret"]; // the app's next token grants more
  streams.live.end(); // the stream ends (e.g. STREAM_MAX_SECONDS); the client reconnects
  await until(() => server.requests.length === 3, 3000, "reconnect");
  assert.deepEqual(server.requests[2].topics, ["public", "secret"]);
});

test("a 403 without topics concerns every topic of that connection", async (t) => {
  const server = await sseServer((req, res) => {
    res.writeHead(403, { "Content-Type": "application/json" });
    res.end(JSON.stringify({ error: { code: "forbidden", message: "no" } }));
  });
  t.after(() => server.close());
  const rt = createClient({ url: server.url });
  t.after(() => rt.close());
  const errors = [];
  rt.subscribe(["a"], () => {}, { onError: (e) => errors.push(e.topics) });
  rt.subscribe(["b"], () => {}, { onError: (e) => errors.push(e.topics) });
  await until(() => rt.status === "unauthorized", 3000, "unauthorized");
  assert.deepEqual(errors, [["a", "b"], ["a", "b"]]);
  await new Promise((resolve) => setTimeout(resolve, 50));
  assert.equal(server.requests.length, 1, "no retry loop on a 403");
});

test("heartbeat watchdog: no bytes for heartbeatTimeoutMs → reconnect from the last id", async (t) => {
  const server = await sseServer((req, res, n) => {
    beginStream(res);
    if (n === 0) res.write(frame({ id: 5, type: "t", topic: "x", data: 1 })); // then silence
  });
  t.after(() => server.close());
  const rt = createClient({ url: server.url, heartbeatTimeoutMs: 150, backoff: fast });
  t.after(() => rt.close());
  rt.subscribe(["x"], () => {});
  await until(() => server.requests.length === 2, 3000, "watchdog reconnect");
  assert.ok(server.requests[1].at - server.requests[0].at >= 150);
  assert.equal(server.requests[1].lastEventId, "5");
  await until(() => server.requests[0].closed, 3000, "old stream closed");
});

test("offline closes, online reconnects at once; hidden past the pause closes, visible reconnects", async (t) => {
  const server = await sseServer((req, res) => beginStream(res));
  t.after(() => server.close());
  const win = new EventTarget();
  const doc = new EventTarget();
  doc.visibilityState = "visible";
  const rt = createClient({ url: server.url, window: win, document: doc, pauseWhenHiddenAfterMs: 100 });
  t.after(() => rt.close());
  rt.subscribe(["x"], () => {});
  await until(() => rt.status === "open", 3000, "open");
  win.dispatchEvent(new Event("offline"));
  assert.equal(rt.status, "offline");
  await until(() => server.requests[0].closed, 3000, "closed when offline");
  win.dispatchEvent(new Event("online"));
  await until(() => rt.status === "open" && server.requests.length === 2, 3000, "online again");
  doc.visibilityState = "hidden";
  doc.dispatchEvent(new Event("visibilitychange"));
  await until(() => rt.status === "paused", 3000, "paused");
  assert.ok(server.requests[1].closed || (await until(() => server.requests[1].closed)));
  doc.visibilityState = "visible";
  doc.dispatchEvent(new Event("visibilitychange"));
  await until(() => rt.status === "open" && server.requests.length === 3, 3000, "visible again");
  // A short hide (under the pause) keeps the stream.
  doc.visibilityState = "hidden";
  doc.dispatchEvent(new Event("visibilitychange"));
  doc.visibilityState = "visible";
  doc.dispatchEvent(new Event("visibilitychange"));
  await new Promise((resolve) => setTimeout(resolve, 150));
  assert.equal(server.requests.length, 3);
  assert.equal(rt.status, "open");
});

test("close() ends everything; the last unsubscribe goes idle", async (t) => {
  const server = await sseServer((req, res) => beginStream(res));
  t.after(() => server.close());
  const rt = createClient({ url: server.url });
  const off = rt.subscribe(["x"], () => {});
  await until(() => rt.status === "open", 3000, "open");
  off();
  await until(() => rt.status === "idle" && server.requests[0].closed, 3000, "idle");
  rt.subscribe(["y"], () => {});
  await until(() => rt.status === "open", 3000, "open again");
  rt.close();
  assert.equal(rt.status, "closed");
  await until(() => server.requests[1].closed, 3000, "closed");
});
