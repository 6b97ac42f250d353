// pgsse × TanStack Query: drive an existing invalidation map from pgsse events, and
// aggregate queries that revalidate with ETags and refresh on `aggregate.invalidated`.
//
//   const stop = connectQueryClient(rt, queryClient, {
//     topics: ["bills", "auctions"],
//     map: {
//       "bill.status.changed": [["bills"], ["bill-stats"]],
//       "auction.item.*": (e) => [["sessions", { id: e.data.session_id }]],
//     },
//   });
//   useQuery(aggregateQuery(rt, "daily_sales", { store_id: 2 }));
//
// Works with any object that has TanStack's `invalidateQueries({queryKey})` (a prefix match);
// no import of @tanstack/* here, so the package keeps no runtime dependency.

import { typeMatches } from "./index.js";

const registries = new WeakMap();

function registry(rt) {
  let entry = registries.get(rt);
  if (!entry) {
    entry = { names: new Set(), listeners: new Set(), etags: new Map(), polls: new Map(),
      stats: { requests: 0, notModified: 0, changed: 0 } };
    registries.set(rt, entry);
  }
  return entry;
}

/** TanStack's key hash: JSON with object keys sorted, so `{a, b}` and `{b, a}` are one key. */
export function hashKey(key) {
  return JSON.stringify(key, (_, value) => {
    if (value && typeof value === "object" && !Array.isArray(value)) {
      return Object.keys(value).sort().reduce((out, k) => { out[k] = value[k]; return out; }, {});
    }
    return value;
  });
}

/** A map value as a list of query keys: one key (`["bills"]`) or a list of keys. */
export function toKeys(value) {
  if (value === null || value === undefined || value === false) return [];
  if (!Array.isArray(value)) throw new TypeError("an invalidation map value is a query key or a list of them");
  if (value.length > 0 && value.every(Array.isArray)) return value;
  return [value];
}

/** The query keys `map` names for `event` (exact types, `*` wildcards, functions of the event). */
export function keysFor(map, event) {
  const keys = [];
  for (const [pattern, value] of Object.entries(map || {})) {
    if (!typeMatches(pattern, event.type)) continue;
    keys.push(...toKeys(typeof value === "function" ? value(event) : value));
  }
  return keys;
}

/** The key prefix of one aggregate's queries (all parameter sets). */
export function aggregateKey(name, params) {
  return params === undefined ? ["pgsse", "aggregate", name] : ["pgsse", "aggregate", name, params];
}

/**
 * Invalidate `queryClient` queries from events: a burst (or a replay) collapses into one
 * `invalidateQueries` per distinct key every `batchMs`; `reset` invalidates everything (and
 * calls `onReset`); `aggregate.invalidated` refreshes the queries made by `aggregateQuery`.
 * Returns the function that stops it.
 */
export function connectQueryClient(rt, queryClient, options = {}) {
  const { topics = [], map = {}, onReset, batchMs = 50 } = options;
  const reg = registry(rt);
  const pending = new Map();
  let everything = false;
  let timer = null;
  let lastReset = null;
  let stopped = false;

  const flush = () => {
    timer = null;
    if (everything) {
      everything = false;
      pending.clear();
      queryClient.invalidateQueries();
      return;
    }
    const keys = [...pending.values()];
    pending.clear();
    for (const queryKey of keys) queryClient.invalidateQueries({ queryKey });
  };
  const schedule = () => {
    if (timer === null && !stopped) timer = setTimeout(flush, batchMs);
  };
  const handler = (event) => {
    if (event.type === "reset") {
      if (lastReset === event) return; // every subscription sees the same reset
      lastReset = event;
      everything = true;
      if (onReset) onReset(event);
      return schedule();
    }
    const keys = event.type === "aggregate.invalidated" && event.data && typeof event.data.aggregate === "string"
      ? [aggregateKey(event.data.aggregate)] : [];
    keys.push(...keysFor(map, event));
    for (const key of keys) pending.set(hashKey(key), key);
    if (keys.length) schedule();
  };

  const offs = [];
  if (topics.length) offs.push(rt.subscribe(topics, handler));
  const watching = new Map();
  const watchAggregates = () => {
    for (const name of reg.names) {
      if (!watching.has(name)) watching.set(name, rt.subscribe(["aggregates/" + name], handler, { types: ["aggregate.invalidated", "reset"] }));
    }
  };
  watchAggregates();
  reg.listeners.add(watchAggregates);
  return () => {
    stopped = true;
    clearTimeout(timer);
    reg.listeners.delete(watchAggregates);
    for (const off of offs) off();
    for (const off of watching.values()) off();
  };
}

function queryString(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params || {})) {
    if (value === undefined || value === null) continue;
    search.append(name, Array.isArray(value) ? value.join(",") : String(value));
  }
  const text = search.toString();
  return text ? "?" + text : "";
}

/**
 * GET /aggregates/<name> with If-None-Match: a 304 returns the body it revalidated. Once the
 * client has an event id it is sent as `min_position` (the data reflects it, on any replica).
 * Resolves to `{data, meta}`; a non-2xx throws an Error with `status` and `body`.
 */
export async function fetchAggregate(rt, name, params = {}, init = {}) {
  const reg = registry(rt);
  const path = "/aggregates/" + encodeURIComponent(name) + queryString(params);
  const cached = reg.etags.get(path);
  const headers = new Headers(init.headers || {});
  if (cached) headers.set("If-None-Match", cached.etag);
  reg.stats.requests += 1;
  // Read-your-events across replicas: the answer reflects every event this client applied
  // (a replica behind it waits, or answers 503 `behind`). Not part of the ETag cache key.
  const since = rt.lastEventId;
  const fresh = since !== null && /^[0-9]+$/.test(since)
    ? path + (path.includes("?") ? "&" : "?") + "min_position=" + since : path;
  const res = await rt.request(fresh, { ...init, headers });
  const poll = reg.polls.get(path) || { intervalMs: 0 };
  reg.polls.set(path, poll);
  if (res.status === 304 && cached) {
    reg.stats.notModified += 1;
    poll.unchanged = (poll.unchanged || 0) + 1;
    return cached.body;
  }
  if (!res.ok) {
    let body = null;
    try { body = await res.json(); } catch { /* not JSON */ }
    const error = new Error(body?.error?.message || `GET ${path}: HTTP ${res.status}`);
    error.status = res.status;
    error.body = body;
    throw error;
  }
  const body = await res.json();
  reg.stats.changed += 1;
  poll.unchanged = 0;
  const etag = res.headers.get("ETag");
  if (etag) reg.etags.set(path, { etag, body });
  if (body && body.meta && body.meta.position !== undefined) rt.seed(body.meta.position);
  return body;
}

/** Counters of aggregate requests made through this client: requests, notModified, changed. */
export function aggregateStats(rt) {
  return registry(rt).stats;
}

/**
 * Query options for one aggregate: `queryKey` `["pgsse", "aggregate", name, params]`, a fetcher
 * that revalidates with ETags (a refetch is a 304), refreshed by `aggregate.invalidated` (via
 * connectQueryClient). While the stream cannot be held (`rt.degraded`) the query polls, from
 * `pollMinMs` up to `pollMaxMs` as answers keep coming back 304, as dashboards did before.
 */
export function aggregateQuery(rt, name, params = {}, options = {}) {
  const { pollMinMs = 3000, pollMaxMs = 30000 } = options;
  const reg = registry(rt);
  if (!reg.names.has(name)) {
    reg.names.add(name);
    for (const listener of [...reg.listeners]) listener();
  }
  const path = "/aggregates/" + encodeURIComponent(name) + queryString(params);
  return {
    queryKey: aggregateKey(name, params),
    queryFn: ({ signal } = {}) => fetchAggregate(rt, name, params, { signal }),
    refetchInterval: () => {
      if (!rt.degraded) return false;
      const poll = reg.polls.get(path);
      const unchanged = poll ? poll.unchanged || 0 : 0;
      return Math.min(pollMaxMs, Math.round(pollMinMs * 1.5 ** unchanged));
    },
  };
}
