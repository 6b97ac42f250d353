// Invalidation map values (contract §11): a query key; a list whose items are query keys or
// functions of the event returning a key or a list of keys; or a function of the event returning
// any of these. Every other shape is a TypeError from connectQueryClient, never a silent no-op.
import assert from "node:assert/strict";
import { test } from "node:test";
import { connectQueryClient, keysFor } from "../src/tanstack-query.js";

const ev = (type, data = {}) => ({ id: "1", type, topic: "t", data });

/** A client that never connects: connectQueryClient only subscribes to it. */
function fakeRt() {
  const subs = [];
  return {
    subs,
    subscribe(topics, handler) { subs.push({ topics, handler }); return () => {}; },
  };
}

/** connectQueryClient on `map`, one event of `type` fed in: resolves to the invalidated keys and errors. */
async function invalidated(map, event) {
  const rt = fakeRt();
  const keys = [];
  const errors = [];
  const queryClient = { invalidateQueries: (f) => keys.push(f ? f.queryKey : "*") };
  const stop = connectQueryClient(rt, queryClient, { topics: ["t"], map, batchMs: 1, onError: (e) => errors.push(e) });
  rt.subs[0].handler(event);
  await new Promise((resolve) => setTimeout(resolve, 20));
  stop();
  return { keys, errors };
}

const VALID = [
  ["a key", ["sessions"], [["sessions"]]],
  ["a key with parameters", ["sessions", { id: 4 }], [["sessions", { id: 4 }]]],
  ["the empty key (everything)", [], [[]]],
  ["a list of keys", [["bills"], ["bill-stats"]], [["bills"], ["bill-stats"]]],
  ["a list of one key", [["bills"]], [["bills"]]],
  ["a key and a function returning a key (the seed 000 map)",
    [["sessions"], (e) => ["sessions", { id: e.data.sessionId }]], [["sessions"], ["sessions", { id: 7 }]]],
  ["a list of functions returning keys or lists of keys",
    [(e) => [["a", e.data.sessionId], ["b"]], () => ["c"]], [["a", 7], ["b"], ["c"]]],
  ["a function returning a key", (e) => ["sessions", e.data.sessionId], [["sessions", 7]]],
  ["a function returning a list of keys", () => [["x"], ["y"]], [["x"], ["y"]]],
  ["a function returning a list of keys and functions",
    (e) => [["x"], (f) => ["y", f.data.sessionId]], [["x"], ["y", 7]]],
  ["a function returning null (nothing this time)", () => null, []],
  ["a function returning false (nothing this time)", () => false, []],
];

for (const [name, value, expected] of VALID) {
  test(`map value: ${name}`, async () => {
    const event = ev("session.status.changed", { sessionId: 7 });
    assert.deepEqual(keysFor({ "session.status.changed": value }, event), expected);
    const { keys, errors } = await invalidated({ "session.*": value }, event);
    assert.deepEqual(errors, []);
    assert.deepEqual(keys, expected);
  });
}

const INVALID = [
  ["a string", "sessions"],
  ["a number", 42],
  ["null", null],
  ["undefined", undefined],
  ["true", true],
  ["an object (TanStack filters, not a key)", { queryKey: ["sessions"] }],
  ["a key mixing parts and a function", ["sessions", (e) => e.data.sessionId]],
  ["a list holding a string", [["sessions"], (e) => ["x"], "bills"]],
  ["a list holding an object", [["sessions"], { queryKey: ["x"] }]],
  ["a key in a list holding a function", [["sessions", () => 1], ["b"]]],
];

for (const [name, value] of INVALID) {
  test(`map value: ${name} throws a TypeError from connectQueryClient`, () => {
    const rt = fakeRt();
    assert.throws(() => connectQueryClient(rt, { invalidateQueries() {} }, { topics: ["t"], map: { "session.*": value } }),
      (error) => error instanceof TypeError && error.message.includes('"session.*"'));
    assert.equal(rt.subs.length, 0, "nothing subscribed");
  });
}

test("a map that is not an object throws a TypeError", () => {
  for (const map of [[["bills"]], "bills", 3, null]) {
    assert.throws(() => connectQueryClient(fakeRt(), { invalidateQueries() {} }, { map }), TypeError);
  }
});

const BAD_RETURNS = [
  ["undefined (a missing return)", () => { ["sessions"]; }],
  ["a string", () => "sessions"],
  ["an object", () => ({ queryKey: ["sessions"] })],
  ["a key mixing parts and a function", () => ["sessions", () => 1]],
  ["a list whose function returns a string", () => [["a"], () => "b"]],
  ["a list whose function returns a function", () => [() => () => ["a"]]],
];

for (const [name, fn] of BAD_RETURNS) {
  test(`a function returning ${name} is reported as a TypeError, the other values still apply`, async () => {
    const event = ev("session.status.changed", { sessionId: 7 });
    assert.throws(() => keysFor({ "session.*": fn }, event), TypeError);
    const { keys, errors } = await invalidated({ "session.*": fn, "session.status.*": ["ok"] }, event);
    assert.deepEqual(keys, [["ok"]]);
    assert.equal(errors.length, 1);
    assert.ok(errors[0] instanceof TypeError && errors[0].message.includes('"session.*"'), errors[0].message);
  });
}

test("without onError, a bad return reaches reportError (the console), not silence", async () => {
  const reported = [];
  const original = globalThis.reportError;
  globalThis.reportError = (error) => reported.push(error);
  try {
    const rt = fakeRt();
    const stop = connectQueryClient(rt, { invalidateQueries() {} }, { topics: ["t"], map: { "x.*": () => "oops" } });
    rt.subs[0].handler(ev("x.y"));
    stop();
  } finally {
    globalThis.reportError = original;
  }
  assert.equal(reported.length, 1);
  assert.ok(reported[0] instanceof TypeError);
});
