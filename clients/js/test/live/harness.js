// Drives the real client against a real pgsse for tests/test_client_js.py: options come as
// one JSON argument, every event / status / getToken call goes to stdout as one JSON line,
// and stdin lines are commands ({"subscribe": [...topics]}, {"close": true}).
import { createHmac } from "node:crypto";
import { createInterface } from "node:readline";
import { createClient } from "../../src/index.js";

const config = JSON.parse(process.argv[2]);
const out = (record) => process.stdout.write(JSON.stringify({ t: Date.now(), ...record }) + "\n");

function jwt(claims, secret) {
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = b64({ alg: "HS256", typ: "JWT" }) + "." + b64(claims);
  return body + "." + createHmac("sha256", secret).update(body).digest("base64url");
}

let tokens = 0;
const getToken = config.secret ? async () => {
  tokens += 1;
  out({ kind: "token", n: tokens });
  return jwt({ topics: config.tokenTopics, exp: Math.floor(Date.now() / 1000) + config.ttl }, config.secret);
} : undefined;

const rt = createClient({ ...config.client, getToken });
rt.on("status", (status, info) => out({ kind: "status", status, attempt: info.attempt ?? null,
  delayMs: info.delayMs ?? null, floorMs: info.floorMs ?? null, degraded: info.degraded,
  error: info.error ? { status: info.error.status ?? null, message: String(info.error.message ?? info.error) } : null }));
rt.on("error", (error) => out({ kind: "error", status: error.status ?? null, code: error.code ?? null }));
for (const [i, topics] of (config.subscriptions || []).entries()) {
  rt.subscribe(topics, (e) => out({ kind: "event", sub: i, id: e.id, type: e.type, topic: e.topic, data: e.data }),
    { onError: (error) => out({ kind: "suberror", sub: i, status: error.status ?? null, topics: error.topics ?? null }) });
}
createInterface({ input: process.stdin }).on("line", (line) => {
  const command = JSON.parse(line);
  if (command.subscribe) rt.subscribe(command.subscribe, (e) => out({ kind: "event", sub: -1, id: e.id, type: e.type, topic: e.topic, data: e.data }));
  if (command.close) { rt.close(); process.exit(0); }
});
out({ kind: "ready" });
