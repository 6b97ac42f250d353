// Topic coverage (segment by segment) and event-type wildcards.
import assert from "node:assert/strict";
import { test } from "node:test";
import { eventReaches, topicCovers, typeMatches } from "../src/match.js";

test("a topic covers itself and topics below it, segment by segment", () => {
  assert.ok(topicCovers("orders", "orders"));
  assert.ok(topicCovers("orders", "orders/42"));
  assert.ok(topicCovers("orders", "orders/42/lines"));
  assert.ok(!topicCovers("orders/4", "orders/42"));
  assert.ok(!topicCovers("orders", "ordersx"));
  assert.ok(!topicCovers("orders/42", "orders"));
});

test("a table's TRUNCATE reaches subscriptions below its topic; nothing else does", () => {
  const truncate = { op: "truncate", table: "public.big", topic: "big", row: null };
  assert.ok(eventReaches("big/7", "big", "big.truncate", truncate));
  assert.ok(eventReaches("big", "big", "big.truncate", truncate));
  assert.ok(!eventReaches("bigger", "big", "big.truncate", truncate));
  assert.ok(!eventReaches("big/7", "big", "big.insert", { op: "insert" }));
  assert.ok(!eventReaches("big/7", "big", "x.truncate", { op: "insert" }));
  assert.ok(!eventReaches("big/7", "big", "x.truncate", null));
  assert.ok(eventReaches("big", "big/7", "big.insert", {}));
});

test("type patterns: exact, *, and * inside", () => {
  assert.ok(typeMatches("bill.status.changed", "bill.status.changed"));
  assert.ok(!typeMatches("bill.status.changed", "bill.status.changedx"));
  assert.ok(typeMatches("*", "anything"));
  assert.ok(typeMatches("bill.*", "bill.status.changed"));
  assert.ok(typeMatches("auction.item.*", "auction.item.bid"));
  assert.ok(!typeMatches("auction.item.*", "auction.items"));
  assert.ok(typeMatches("*.insert", "orders.insert"));
  assert.ok(!typeMatches("*.insert", "orders.update"));
  assert.ok(!typeMatches("orders.*", "ordersXinsert"), "dots are literal");
  assert.ok(typeMatches("a*c", "abbbc"));
});
