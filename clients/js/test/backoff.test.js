// Full-jitter backoff envelope with an injected random source.
import assert from "node:assert/strict";
import { test } from "node:test";
import { backoffCeiling, backoffDelay } from "../src/backoff.js";

const options = { initialMs: 1000, maxMs: 32000, minMs: 100 };

test("the window doubles from initialMs and is capped at maxMs", () => {
  const ceilings = [0, 1, 2, 3, 4, 5, 6, 40].map((n) => backoffCeiling(n, options));
  assert.deepEqual(ceilings, [1000, 2000, 4000, 8000, 16000, 32000, 32000, 32000]);
});

test("random 1 hits the ceiling, random 0 the minimum: never a zero delay", () => {
  for (let attempt = 0; attempt < 10; attempt++) {
    assert.equal(backoffDelay(attempt, 0, { ...options, random: () => 1 }), backoffCeiling(attempt, options));
    assert.equal(backoffDelay(attempt, 0, { ...options, random: () => 0 }), 100);
  }
});

test("every draw lies inside [max(minMs, floor), max(floor, ceiling)]", () => {
  let seed = 42;
  const random = () => ((seed = (seed * 16807) % 2147483647) / 2147483647);
  for (let attempt = 0; attempt < 12; attempt++) {
    for (const floor of [0, 50, 2000, 60000]) {
      for (let i = 0; i < 200; i++) {
        const delay = backoffDelay(attempt, floor, { ...options, random });
        assert.ok(delay >= Math.max(100, floor), `${delay} below the floor ${floor}`);
        assert.ok(delay <= Math.max(floor, backoffCeiling(attempt, options)), `${delay} above the window`);
      }
    }
  }
});

test("the draws spread over the window (jitter, not a fixed step)", () => {
  const draws = Array.from({ length: 11 }, (_, i) => backoffDelay(3, 0, { ...options, random: () => i / 10 }));
  assert.deepEqual(draws, [100, 800, 1600, 2400, 3200, 4000, 4800, 5600, 6400, 7200, 8000]);
});

test("Retry-After / retry: raise the delay to the server's floor", () => {
  assert.equal(backoffDelay(0, 5000, { ...options, random: () => 0.5 }), 5000);
  assert.equal(backoffDelay(5, 5000, { ...options, random: () => 0.5 }), 16000);
});
