// Parser parity: our parser and the npm eventsource-parser agree on every vector, fed whole,
// one character at a time, and split at every position.
import assert from "node:assert/strict";
import { test } from "node:test";
import { createParser as reference } from "eventsource-parser";
import { createParser } from "../src/parser.js";

const VECTORS = {
  "simple": "data: hello\n\n",
  "no space after colon": "data:hello\n\n",
  "two spaces keep one": "data:  hello\n\n",
  "multi-line data": "data: a\ndata: b\ndata:\n\n",
  "empty data dispatches": "data\n\n",
  "id and event": "id: 7\nevent: orders.insert\ndata: {\"x\":1}\n\n",
  "id is per event": "id: 1\ndata: a\n\ndata: b\n\n",
  "id with NUL ignored": "id: 1\0 2\ndata: a\n\n",
  "empty event name means message": "event:\ndata: a\n\n",
  "CRLF line ends": "id: 3\r\nevent: t\r\ndata: x\r\n\r\n",
  // (eventsource-parser holds a chunk's final CR until it sees what follows; we dispatch at
  // once and skip a following LF: same events, sooner. So CR vectors end with another line.)
  "CR line ends": "id: 4\revent: t\rdata: x\r\r: end\n",
  "mixed line ends": "data: a\r\ndata: b\rdata: c\n\r\n",
  "comments": ": keep-alive\n:no space\ndata: after\n\n",
  "retry valid and invalid": "retry: 1500\nretry: 15x\nretry:\ndata: r\n\n",
  "unknown fields ignored": "foo: bar\ndata: y\nbaz\n\n",
  "block without data is not dispatched": "event: ping\nid: 9\n\ndata: z\n\n",
  "no final blank line: nothing": "data: pending\n",
  "colon in value": "data: a: b: c\n\n",
  "unicode": "data: {\"name\":\"Zoë ☕ 😀\"}\n\n",
  "pgsse frames": "retry: 2000\n\n: keep-alive\n\nid: 12\nevent: reset\ndata: {\"topic\":null,\"data\":{\"reason\":\"history_expired\"}}\n\nevent: aggregate.invalidated\ndata: {\"topic\":\"aggregates/x\",\"data\":{\"aggregate\":\"x\"}}\n\n",
  "field name only": "data\ndata\n\n",
  "event then data later": "event: a\n\nevent: b\ndata: 1\n\n",
};

function run(factory, chunks) {
  const out = [];
  const parser = factory({
    onEvent: (e) => out.push(["event", e.id, e.event, e.data]),
    onRetry: (ms) => out.push(["retry", ms]),
    onComment: (c) => out.push(["comment", c]),
  });
  for (const chunk of chunks) parser.feed(chunk);
  return out;
}

for (const [name, text] of Object.entries(VECTORS)) {
  test(`parity: ${name}`, () => {
    const expected = run(reference, [text]);
    assert.deepEqual(run(createParser, [text]), expected, "whole");
    assert.deepEqual(run(createParser, [...text]), expected, "one character at a time");
    for (let i = 1; i < text.length; i++) {
      assert.deepEqual(run(createParser, [text.slice(0, i), text.slice(i)]), expected, `split at ${i}`);
    }
    // The reference agrees with itself chunked, so the vector is a fair one.
    assert.deepEqual(run(reference, [...text]), expected);
  });
}

test("a byte-order mark at the start is skipped (as TextDecoder and the spec do)", () => {
  assert.deepEqual(run(createParser, ["\uFEFFdata: a\n\n"]), [["event", undefined, undefined, "a"]]);
});

test("a final CR dispatches at once; an LF in the next chunk completes that CRLF", () => {
  const out = [];
  const parser = createParser({ onEvent: (e) => out.push(e.data), onComment: (c) => out.push("#" + c) });
  parser.feed("data: a\r\r");
  assert.deepEqual(out, ["a"]);
  parser.feed("\n: c\n");
  assert.deepEqual(out, ["a", "#c"]);
});

test("reset forgets a partial event", () => {
  const out = [];
  const parser = createParser({ onEvent: (e) => out.push(e.data) });
  parser.feed("data: half");
  parser.reset();
  parser.feed("data: whole\n\n");
  assert.deepEqual(out, ["whole"]);
});
