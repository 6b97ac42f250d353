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

// Map values (contract §11): a query key (`["bills"]`); a list whose items are query keys or
// functions of the event returning a key or a list of keys (`[["bills"], (e) => ["bill", e.data.id]]`);
// or a function of the event returning any of these (null or false: nothing this time). An array
// whose first item is an array or a function is a list, any other array a key (TanStack keys
// start with a name). What fits none of these is a TypeError: at connectQueryClient for what can
// be seen then, when called for a function's return. (A list mixing keys and functions used to
// be taken as one bogus key, silently: its queries were never invalidated.)

const SHAPES = "a query key (an array), a list of query keys and/or functions of the event, or a function of the event";

function describe(value) {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  if (typeof value === "object") return "an object" + ("queryKey" in value ? " (filters, not a key: use its queryKey)" : "");
  return typeof value === "undefined" ? "undefined (a missing return?)" : `a ${typeof value}`;
}

function isList(value) {
  return value.length > 0 && (Array.isArray(value[0]) || typeof value[0] === "function");
}

function checkKey(key, where) {
  const at = key.findIndex((part) => typeof part === "function");
  if (at >= 0) throw new TypeError(`${where} is a query key holding a function at [${at}]; a function belongs in a list of keys and functions, e.g. [["a"], (e) => ["b", e.data.id]]`);
}

function checkList(list, where, functions) {
  list.forEach((item, i) => {
    if (Array.isArray(item)) checkKey(item, `${where}[${i}]`);
    else if (typeof item !== "function" || !functions) {
      throw new TypeError(`${where}[${i}] is ${describe(item)}; a list's items are query keys${functions ? " or functions of the event" : ""}`);
    }
  });
}

/** Throw a TypeError unless `value` is a map value; what functions return is checked when called. */
export function checkMapValue(value, where = "an invalidation map value") {
  if (typeof value === "function") return;
  if (!Array.isArray(value)) throw new TypeError(`${where} is ${describe(value)}; it must be ${SHAPES}`);
  if (isList(value)) checkList(value, where, true);
  else checkKey(value, where);
}

/**
 * A map value as query keys, calling its functions with `event`. `nested`: a list item's
 * function returned `value`, which must be a key or a list of keys.
 */
function collect(value, event, where, nested = false) {
  if (typeof value === "function") {
    const result = value(event);
    if (result === null || result === false) return [];
    if (!Array.isArray(result)) {
      throw new TypeError(`${where}: the function returned ${describe(result)}; it must return ${nested ? "a query key or a list of keys" : "a query key or a list of keys and/or functions"} (null or false for none)`);
    }
    return collect(result, event, `${where}: the function's return`, nested);
  }
  if (!Array.isArray(value)) throw new TypeError(`${where} is ${describe(value)}; it must be ${nested ? "a query key or a list of keys" : SHAPES}`);
  if (!isList(value)) {
    checkKey(value, where);
    return [value];
  }
  checkList(value, where, !nested);
  return value.flatMap((item, i) => (Array.isArray(item) ? [item] : collect(item, event, `${where}[${i}]`, true)));
}

/** A map value as a list of query keys: one key (`["bills"]`) or a list of keys; null/false: none. */
export function toKeys(value, event = undefined) {
  if (value === null || value === false) return [];
  return collect(value, event, "an invalidation map value");
}

/**
 * The query keys `map` names for `event` (exact types, `*` wildcards, functions of the event).
 * A value that is not a map value throws a TypeError; with `onError`, it is reported there and
 * the other values still apply.
 */
export function keysFor(map, event, onError = null) {
  const keys = [];
  for (const [pattern, value] of Object.entries(map || {})) {
    if (!typeMatches(pattern, event.type)) continue;
    try {
      keys.push(...collect(value, event, `map[${JSON.stringify(pattern)}]`));
    } catch (error) {
      if (!onError || !(error instanceof TypeError)) throw error;
      onError(error, event);
    }
  }
  return keys;
}

/** Throw a TypeError unless `map` is an object of map values. */
export function checkMap(map) {
  if (map === null || typeof map !== "object" || Array.isArray(map)) {
    throw new TypeError(`connectQueryClient: map is ${describe(map)}; it must be an object of event type → ${SHAPES}`);
  }
  for (const [pattern, value] of Object.entries(map)) checkMapValue(value, `connectQueryClient: map[${JSON.stringify(pattern)}]`);
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
  const { topics = [], map = {}, onReset, batchMs = 50, onError = reportError } = options;
  checkMap(map);
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
    keys.push(...keysFor(map, event, onError));
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

function reportError(error) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else setTimeout(() => { throw error; });
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
