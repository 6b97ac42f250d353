// A real HTTP server on 127.0.0.1 for the client's unit tests: each test scripts its answers.
import http from "node:http";

/**
 * Start a server whose `/events` requests are answered by `handler(req, res, n)`
 * (n = 0-based request count). Returns {url, requests, close, waitFor}.
 */
export async function sseServer(handler) {
  const requests = [];
  const open = new Set();
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, "http://x");
    const entry = { url, headers: req.headers, topics: url.searchParams.getAll("topic"),
      lastEventId: url.searchParams.get("last_event_id"), at: Date.now(), closed: false };
    requests.push(entry);
    open.add(res);
    res.on("close", () => { entry.closed = true; open.delete(res); });
    handler(req, res, requests.length - 1, entry);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}`,
    requests,
    open,
    async close() {
      for (const res of open) res.destroy();
      const closed = new Promise((resolve) => server.close(resolve));
      server.closeAllConnections();
      await closed;
    },
  };
}

/** Begin an event stream on `res` (200, text/event-stream) with an optional retry:. */
export function beginStream(res, retryMs) {
  res.writeHead(200, { "Content-Type": "text/event-stream", "Cache-Control": "no-store" });
  if (retryMs !== undefined) res.write(`retry: ${retryMs}\n\n`);
  else res.write(": open\n\n");
}

/** One enveloped event frame, as pgsse sends with envelope=1. */
export function frame({ id, type, topic, data }) {
  const lines = [];
  if (id !== undefined && id !== null) lines.push(`id: ${id}`);
  lines.push(`event: ${type}`);
  lines.push(`data: ${JSON.stringify({ topic, data })}`);
  return lines.join("\n") + "\n\n";
}

/** Resolve when `predicate()` holds, polling every 5 ms; reject after `timeoutMs`. */
export async function until(predicate, timeoutMs = 5000, what = "condition") {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}
