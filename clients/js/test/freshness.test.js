// Read-your-events across replicas: the aggregate fetcher sends the client's last event id as
// min_position, so a replica behind that position waits (or answers 503 behind).
import assert from "node:assert/strict";
import { test } from "node:test";
import { createClient } from "../src/index.js";
import { fetchAggregate } from "../src/tanstack-query.js";
import { sseServer } from "./helpers.js";

test("fetchAggregate sends the last event id as min_position; ETags still revalidate", async (t) => {
  const seen = [];
  const server = await sseServer((req, res, n, entry) => {
    seen.push({ search: entry.url.search, inm: req.headers["if-none-match"] || null });
    if (req.headers["if-none-match"] === 'W/"a"') { res.writeHead(304, { ETag: 'W/"a"' }); res.end(); return; }
    res.writeHead(200, { "Content-Type": "application/json", ETag: 'W/"a"' });
    res.end(JSON.stringify({ data: [], meta: { position: 5 } }));
  });
  t.after(() => server.close());
  const rt = createClient({ url: server.url });
  t.after(() => rt.close());
  await fetchAggregate(rt, "daily_sales", { store_id: 2 });
  assert.equal(seen[0].search, "?store_id=2", "no position yet: nothing to ask for");
  rt.lastEventId = "41"; // as after applying event 41 from a stream
  const body = await fetchAggregate(rt, "daily_sales", { store_id: 2 });
  assert.equal(seen[1].search, "?store_id=2&min_position=41");
  assert.equal(seen[1].inm, 'W/"a"', "the ETag cache is keyed without min_position");
  assert.deepEqual(body, { data: [], meta: { position: 5 } });
  await fetchAggregate(rt, "event_types");
  assert.equal(seen[2].search, "?min_position=41");
});
