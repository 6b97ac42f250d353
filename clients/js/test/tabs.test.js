// Tabs sharing one stream (tabs.js), in node: several clients play the tabs of one origin, with
// node's own BroadcastChannel and a small Web Locks stand-in (exclusive locks granted in request
// order, held until the callback's promise settles, released by an abort before the grant).
// Real Chromium tabs: tests/test_client_tabs_browser.py.
import assert from "node:assert/strict";
import { test } from "node:test";
import { canShareTabs, createClient } from "../src/index.js";
import { beginStream, frame, sseServer, until } from "./helpers.js";

const fast = { initialMs: 20, maxMs: 200, minMs: 5 };

function lockManager() {
  const queues = new Map(); // name → [{callback, resolve, reject, granted}]
  const grant = (name) => {
    const queue = queues.get(name) || [];
    const head = queue[0];
    if (!head || head.granted) return;
    head.granted = true;
    Promise.resolve().then(() => head.callback({ name })).then(head.resolve, head.reject).finally(() => {
      queue.shift();
      grant(name);
    });
  };
  return {
    request(name, options, callback) {
      return new Promise((resolve, reject) => {
        const entry = { callback, resolve, reject, granted: false };
        if (!queues.has(name)) queues.set(name, []);
        queues.get(name).push(entry);
        options.signal?.addEventListener("abort", () => {
          if (entry.granted) return;
          const queue = queues.get(name);
          queue.splice(queue.indexOf(entry), 1);
          reject(new Error("AbortError"));
        });
        grant(name);
      });
    },
    async query() {
      const held = [];
      const pending = [];
      for (const [name, queue] of queues) for (const e of queue) (e.granted ? held : pending).push({ name });
      return { held, pending };
    },
  };
}

/** A "tab": a client with a window, a navigator holding the shared locks, and BroadcastChannel. */
function tab(url, locks, topics, got) {
  const win = new EventTarget();
  const rt = createClient({ url, backoff: fast, window: win, navigator: { onLine: true, locks }, document: null });
  rt.subscribe(topics, (e) => got.push(e.data.n));
  return { rt, win };
}

test("sharing needs Web Locks, BroadcastChannel and a page", () => {
  assert.equal(canShareTabs({}), false, "node has no window");
  assert.equal(canShareTabs({ window: {}, navigator: {} }), false, "no navigator.locks");
  assert.equal(canShareTabs({ window: {}, navigator: { locks: lockManager() } }), true);
  const solo = createClient({ url: "http://127.0.0.1:9", window: new EventTarget(), navigator: { locks: lockManager() }, shareTabs: false });
  assert.equal(solo.role, "solo");
  solo.close();
});

test("three tabs: one stream with the union of topics, each tab its own events once, in order", async (t) => {
  let stream;
  const server = await sseServer((req, res) => { beginStream(res); stream = res; });
  t.after(() => server.close());
  const locks = lockManager();
  const got = [[], [], []];
  const tabs = [0, 1, 2].map((i) => tab(server.url, locks, [`t/${i}`], got[i]));
  t.after(() => tabs.forEach(({ rt }) => rt.close()));
  await until(() => server.requests.at(-1)?.topics.length === 3 && stream && tabs.every(({ rt }) => rt.status === "open"), 3000, "union stream");
  assert.deepEqual(tabs.map(({ rt }) => rt.role).sort(), ["follower", "follower", "holder"]);
  assert.equal(server.requests.filter((r) => !r.closed).length, 1);
  for (let n = 1; n <= 30; n++) stream.write(frame({ id: n, type: "tick", topic: `t/${n % 3}`, data: { n } }));
  await until(() => got.every((g) => g.length === 10), 3000, "every tab's events");
  await new Promise((resolve) => setTimeout(resolve, 30));
  got.forEach((g, i) => assert.deepEqual(g, Array.from({ length: 30 }, (_, k) => k + 1).filter((n) => n % 3 === i)));
  assert.ok(tabs.every(({ rt }) => rt.lastEventId === "30"));
});

test("the holder leaves: the next tab holds within the debounce, from the last id; a tab behind catches up", async (t) => {
  const streams = [];
  const server = await sseServer((req, res) => { beginStream(res); streams.push(res); });
  t.after(() => server.close());
  const locks = lockManager();
  const got = [[], []];
  const tabs = [0, 1].map((i) => tab(server.url, locks, [`t/${i}`], got[i]));
  t.after(() => tabs.forEach(({ rt }) => rt.close()));
  await until(() => server.requests.at(-1)?.topics.length === 2 && tabs.every(({ rt }) => rt.status === "open"), 3000, "union stream");
  for (let n = 1; n <= 4; n++) streams.at(-1).write(frame({ id: n, type: "tick", topic: `t/${n % 2}`, data: { n } }));
  await until(() => got[0].length === 2 && got[1].length === 2, 3000, "first events");
  const holder = tabs.find(({ rt }) => rt.role === "holder");
  const other = tabs.find(({ rt }) => rt.role === "follower");
  const otherGot = got[tabs.indexOf(other)];
  holder.win.dispatchEvent(Object.assign(new Event("pagehide"), { persisted: true }));
  await until(() => other.rt.role === "holder" && server.requests.at(-1).lastEventId === "4", 3000, "hand-over from id 4");
  assert.deepEqual(server.requests.at(-1).topics, [other.rt.ownTopics()[0]], "the leaving tab's topic is dropped");
  for (let n = 5; n <= 8; n++) streams.at(-1).write(frame({ id: n, type: "tick", topic: `t/${n % 2}`, data: { n } }));
  await until(() => otherGot.length === 4, 3000, "its events");
  // Back from the cache: the tab rejoins as a follower from id 4; the holder goes back to 4 for it.
  const before = server.requests.length;
  holder.win.dispatchEvent(Object.assign(new Event("pageshow"), { persisted: true }));
  await until(() => server.requests.length > before && server.requests.at(-1).lastEventId === "4"
    && server.requests.at(-1).topics.length === 2, 3000, "rewound to id 4 with both topics");
  assert.equal(holder.rt.role, "follower");
  await until(() => !server.requests.at(-1).closed && streams.length === server.requests.length, 3000, "stream");
  for (let n = 5; n <= 10; n++) streams.at(-1).write(frame({ id: n, type: "tick", topic: `t/${n % 2}`, data: { n } }));
  await until(() => got.every((g) => g.length === 5), 3000, "every tab's events");
  await new Promise((resolve) => setTimeout(resolve, 30));
  assert.deepEqual(got[0], [2, 4, 6, 8, 10]);
  assert.deepEqual(got[1], [1, 3, 5, 7, 9]);
});

test("status, errors and reset reach every tab; a follower's reconnect() reaches the holder", async (t) => {
  let stream;
  const server = await sseServer((req, res) => { beginStream(res); stream = res; });
  t.after(() => server.close());
  const locks = lockManager();
  const got = [[], []];
  const tabs = [0, 1].map((i) => tab(server.url, locks, [`t/${i}`], got[i]));
  t.after(() => tabs.forEach(({ rt }) => rt.close()));
  const resets = [[], []];
  tabs.forEach(({ rt }, i) => rt.on("reset", (e) => resets[i].push(e.data.reason)));
  await until(() => server.requests.at(-1)?.topics.length === 2 && tabs.every(({ rt }) => rt.status === "open"), 3000, "open in both");
  stream.write(frame({ id: 7, type: "reset", topic: null, data: { reason: "history_expired" } }));
  await until(() => resets.every((r) => r.length === 1), 3000, "reset in both tabs");
  const follower = tabs.find(({ rt }) => rt.role === "follower");
  const before = server.requests.length;
  follower.rt.reconnect();
  await until(() => server.requests.length > before, 3000, "the holder reconnected");
  assert.equal(server.requests.at(-1).lastEventId, "7");
  stream.destroy();
  await until(() => follower.rt.status === "backoff" || server.requests.length > before + 1, 3000, "the holder's backoff reaches the follower");
});

test("a hidden holder pauses only when every tab is hidden; a tab coming back wakes it", async (t) => {
  const server = await sseServer((req, res) => beginStream(res));
  t.after(() => server.close());
  const locks = lockManager();
  const docs = [0, 1].map(() => Object.assign(new EventTarget(), { visibilityState: "visible" }));
  const tabs = docs.map((document, i) => createClient({ url: server.url, backoff: fast, window: new EventTarget(),
    navigator: { onLine: true, locks }, document, pauseWhenHiddenAfterMs: 30 }));
  t.after(() => tabs.forEach((rt) => rt.close()));
  tabs.forEach((rt, i) => rt.subscribe([`t/${i}`], () => {}));
  await until(() => server.requests.at(-1)?.topics.length === 2 && tabs.every((rt) => rt.status === "open"), 3000, "open");
  const h = tabs.findIndex((rt) => rt.role === "holder");
  const f = 1 - h;
  const hide = (i, state) => { docs[i].visibilityState = state; docs[i].dispatchEvent(new Event("visibilitychange")); };
  hide(h, "hidden");
  await new Promise((resolve) => setTimeout(resolve, 120));
  assert.equal(tabs[h].status, "open", "the other tab is visible: keep streaming");
  hide(f, "hidden");
  hide(h, "hidden"); // the holder's own timer runs again, now with every tab hidden
  await until(() => tabs.every((rt) => rt.status === "paused"), 3000, "paused in both tabs");
  hide(f, "visible");
  await until(() => tabs.every((rt) => rt.status === "open"), 3000, "the visible tab woke the stream");
});

test("a 403 at the holder reaches the follower's refused subscription; a follower's seed replays from there", async (t) => {
  const streams = [];
  const server = await sseServer((req, res, n, entry) => {
    if (entry.topics.includes("secret")) {
      res.writeHead(403, { "Content-Type": "application/json" });
      res.end(JSON.stringify({ error: { code: "forbidden", message: "no", topics: ["secret"] } }));
      return;
    }
    beginStream(res);
    streams.push(res);
  });
  t.after(() => server.close());
  const locks = lockManager();
  const got = [];
  const first = tab(server.url, locks, ["t/0"], []);
  await until(() => first.rt.role === "holder" && first.rt.status === "open", 3000, "holder open");
  for (let n = 1; n <= 5; n++) streams.at(-1).write(frame({ id: n, type: "tick", topic: "t/1", data: { n } }));
  await until(() => first.rt.lastEventId === "5", 3000, "holder at 5");
  const second = tab(server.url, locks, ["t/1"], got);
  t.after(() => { first.rt.close(); second.rt.close(); });
  const refused = [];
  second.rt.subscribe(["secret"], () => {}, { onError: (e) => refused.push(e.topics) });
  await until(() => refused.length === 1, 3000, "the refusal in the follower");
  assert.deepEqual(refused[0], ["secret"]);
  await until(() => server.requests.at(-1).topics.join() === "t/0,t/1" && !server.requests.at(-1).closed, 3000, "without the refused topic");
  // No event has reached the new tab yet: seeding it from a snapshot at 2 asks the holder to
  // replay 3..5 for it.
  assert.equal(second.rt.lastEventId, null);
  second.rt.seed(2);
  await until(() => server.requests.at(-1).lastEventId === "2", 3000, "rewound to 2");
  await until(() => streams.length === server.requests.filter((r) => !r.topics.includes("secret")).length, 3000, "stream");
  for (let n = 3; n <= 6; n++) streams.at(-1).write(frame({ id: n, type: "tick", topic: "t/1", data: { n } }));
  await until(() => got.length === 4, 3000, "3..6 in the follower");
  assert.deepEqual(got, [3, 4, 5, 6]);
  assert.equal(first.rt.lastEventId, "6", "the holder dropped the replay of 3..5 but kept 6");
});

test("getToken runs in the holding tab only; the stream carries the holder's token", async (t) => {
  const server = await sseServer((req, res) => beginStream(res));
  t.after(() => server.close());
  const locks = lockManager();
  const calls = [0, 0];
  const tabs = [0, 1].map((i) => createClient({ url: server.url, backoff: fast, window: new EventTarget(),
    navigator: { onLine: true, locks }, document: null, getToken: async () => { calls[i] += 1; return `token-${i}`; } }));
  t.after(() => tabs.forEach((rt) => rt.close()));
  tabs.forEach((rt, i) => rt.subscribe([`t/${i}`], () => {}));
  await until(() => server.requests.at(-1)?.topics.length === 2 && tabs.every((rt) => rt.status === "open"), 3000, "open");
  const h = tabs.findIndex((rt) => rt.role === "holder");
  assert.equal(calls[1 - h], 0, "the follower never fetched a token");
  assert.ok(calls[h] >= 1);
  assert.equal(server.requests.at(-1).headers.authorization, `Bearer token-${h}`);
});

test("a follower takes relayed events only from a stream that carries all its topics", async () => {
  const { TabGroup } = await import("../src/tabs.js");
  const delivered = [];
  const client = { topics: ["tabs/0"], ownTopics: () => ["tabs/0"], _deliver: (e) => delivered.push(e.id) };
  const group = new TabGroup(client, { name: "x", locks: lockManager(), BroadcastChannel: class {} });
  group.channel = { postMessage() {}, close() {} }; // joined, without a real channel
  // The holder's stream before it reconnects with this tab's topic: its events would move this
  // tab's last id past tabs/0 events that stream never carried (the returning-tab race).
  group._receive({ kind: "event", event: { id: "30", type: "tick", topic: "tabs/1", data: {} }, topics: ["tabs/1"] });
  assert.deepEqual(delivered, []);
  group._receive({ kind: "event", event: { id: "31", type: "tick", topic: "tabs/0", data: {} }, topics: ["tabs/0", "tabs/1"] });
  group._receive({ kind: "event", event: { id: "32", type: "tick", topic: "tabs/1", data: {} }, topics: ["tabs"] });
  group._receive({ kind: "event", event: { id: "33", type: "tick", topic: "tabs/1", data: {} } }); // an older holder
  assert.deepEqual(delivered, ["31", "32", "33"]);
});
