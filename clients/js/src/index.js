// pgsse browser client: one resumable Server-Sent Events connection per client, shared by
// every subscription, over fetch (so it can send Authorization, see heartbeats, survive a
// 502 and resume after an expired token). No dependencies, no build step.
//
//   import { createClient } from "pgsse";          // or from "https://host/client.js"
//   const rt = createClient({ url: "https://rt.example.com", getToken });
//   const off = rt.subscribe(["orders/7"], (e) => console.log(e.type, e.data), { types: ["orders.*"] });
//
// Delivery: each event with an id is delivered once, in position order; the client resumes
// every connection with `last_event_id`, so reconnects (network, 5xx, deploys, expired
// tokens, paused tabs) lose nothing the server still retains. When it no longer does, the
// server sends `reset` and the app refetches its state.
//
// Tabs: the tabs of one origin with a client for the same URL share one stream (tabs.js): one
// tab holds it with every tab's topics, the others receive over BroadcastChannel. A page going
// into the back/forward cache closes its stream (pagehide) and resumes from its last id when
// restored (pageshow), so a busy dashboard is restored rather than reloaded.

import { backoffCeiling, backoffDelay, DEFAULT_BACKOFF } from "./backoff.js";
import { createParser } from "./parser.js";
import { eventReaches, topicCovers, typeMatches } from "./match.js";
import { canShareTabs, TabGroup } from "./tabs.js";

export { backoffCeiling, backoffDelay, canShareTabs, createParser, DEFAULT_BACKOFF, eventReaches, topicCovers, typeMatches };

export const VERSION = "0.1.0";

/** Every value `client.status` takes. */
export const STATUSES = Object.freeze([
  "idle", "connecting", "open", "backoff", "paused", "offline", "unauthorized", "closed",
]);

/** @param {import("./index.js").ClientOptions} [options] */
export function createClient(options) {
  return new PgsseClient(options);
}

const MAX_POSITION = 2n ** 63n - 1n;

export class PgsseClient {
  constructor(options = {}) {
    const base = options.url ?? "";
    this.url = String(base).replace(/\/+$/, "");
    this.getToken = options.getToken || null;
    this.credentials = options.credentials || "same-origin";
    this.backoff = { ...DEFAULT_BACKOFF, ...(options.backoff || {}) };
    this.heartbeatTimeoutMs = options.heartbeatTimeoutMs ?? 45000;
    this.pauseWhenHiddenAfterMs = options.pauseWhenHiddenAfterMs ?? 60000;
    this.debounceMs = options.debounceMs ?? 10;
    this.degradeAfter = options.degradeAfter ?? 3;
    this.fetchImpl = options.fetch || ((...args) => globalThis.fetch(...args));
    this.lastEventId = options.since === undefined || options.since === null ? null : String(options.since);
    // Where the next connection resumes: the last id read from the stream, or further back when
    // another tab must catch up (this tab still delivers each id once, by lastEventId).
    this._cursor = this.lastEventId;
    // The earliest position a tab that is behind asked for (see _rewind): the next connection
    // resumes from it even if this connection's cursor moved on meanwhile.
    this._floor = null;
    this.status = "idle";
    /** True after `degradeAfter` failed connections in a row: aggregate queries poll. */
    this.degraded = false;
    /** Counters for dashboards and tests. */
    this.stats = { connections: 0, events: 0, failures: 0 };

    this._subs = new Set();
    this._listeners = new Map();
    this._attempt = 0;
    this._conn = null;
    this._gen = 0;
    this._timer = null;
    this._debounce = null;
    this._watchdog = null;
    this._hiddenTimer = null;
    this._denied = new Set();
    this._authFailures = 0;
    this._grant = undefined;
    this._paused = false;
    this._offline = false;
    this._closed = false;
    this._started = false;
    this._frozen = false;
    this._share = null;
    this._cleanup = this._watchEnvironment(options);
    if (options.shareTabs !== false && canShareTabs(options)) {
      const nav = options.navigator ?? globalThis.navigator;
      const doc = options.document ?? globalThis.document;
      const here = globalThis.location?.href;
      this._share = new TabGroup(this, {
        name: here ? new URL(this.url || "/", here).href.replace(/\/+$/, "") : this.url,
        locks: nav.locks,
        BroadcastChannel: options.BroadcastChannel,
        visible: () => !(doc && (doc.visibilityState === "hidden" || doc.hidden === true)),
      });
      this._share.join();
    }
  }

  /** `holder`: this tab holds the stream for its origin's tabs; `follower`: another tab does; `solo`: not shared. */
  get role() {
    if (!this._share) return "solo";
    return this._share.holding ? "holder" : "follower";
  }

  // --- public API -------------------------------------------------------------------------

  /**
   * Receive events on `topics` (and every topic below them). Returns the unsubscribe function.
   * @param {string | string[]} topics
   * @param {(event: object) => void} handler
   * @param {{types?: string[], onError?: (error: object) => void}} [options]
   */
  subscribe(topics, handler, options = {}) {
    const list = (Array.isArray(topics) ? topics : [topics]).map(String);
    if (list.length === 0) throw new TypeError("subscribe: at least one topic");
    const sub = { topics: list, handler, types: options.types || null, onError: options.onError || null };
    this._subs.add(sub);
    const denied = list.filter((t) => this._denied.has(t));
    if (denied.length) this._report([sub], { status: 403, code: "forbidden", message: "topic not granted", topics: denied });
    this._scheduleSync();
    let active = true;
    return () => {
      if (!active) return;
      active = false;
      this._subs.delete(sub);
      this._scheduleSync();
    };
  }

  /**
   * Listen to `status` (status, info), `event` (every event), `reset` (event) or `error`.
   * Returns the function that removes the listener.
   */
  on(name, fn) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(fn);
    return () => this._listeners.get(name)?.delete(fn);
  }

  /**
   * The topics the connection carries: the union of all subscriptions (in the holding tab, of
   * every tab's), minus denied ones.
   */
  get topics() {
    const set = new Set(this.ownTopics());
    if (this._share?.holding) for (const t of this._share.peerTopics()) set.add(t);
    return [...set].filter((t) => !this._denied.has(t)).sort();
  }

  /** This tab's own subscriptions' topics. */
  ownTopics() {
    const set = new Set();
    for (const sub of this._subs) for (const t of sub.topics) set.add(t);
    return [...set].sort();
  }

  /**
   * Resume from `position` (e.g. an aggregate's `meta.position`) if the client has no
   * position yet: a connection still being made restarts from it, so nothing between that
   * snapshot and the stream is missed; a later reconnect of an open one replays from it.
   */
  seed(position) {
    if (this.lastEventId !== null || position === undefined || position === null) return;
    if (!isPosition(String(position))) return;
    this.lastEventId = String(position);
    this._cursor = this.lastEventId;
    if (this._share && !this._share.holding) return this._share.announce(this.lastEventId);
    if (this._conn && this.status === "connecting") this._connect();
  }

  /** Reconnect now from the last id (e.g. after the app changed its token). */
  reconnect() {
    if (this._closed) return;
    this._denied.clear();
    if (this._share && !this._share.holding) return this._share.requestReconnect();
    this._clearTimer();
    this._abort();
    this._paused = false;
    this._connect();
  }

  /** Close for good: no more connections, timers or listeners. */
  close() {
    if (this._closed) return;
    this._closed = true;
    this._clearTimer();
    clearTimeout(this._debounce);
    clearTimeout(this._hiddenTimer);
    this._abort();
    this._cleanup();
    this._share?.leave();
    this._setStatus("closed");
  }

  /**
   * fetch() a path of the service with the client's credentials (Authorization from
   * getToken, `credentials`); a 401 is retried once with a fresh token.
   */
  async request(path, init = {}) {
    const url = /^https?:/.test(path) ? path : this.url + path;
    for (let tries = 0; ; tries++) {
      const headers = new Headers(init.headers || {});
      const token = this.getToken ? await this.getToken() : null;
      if (token) headers.set("Authorization", "Bearer " + token);
      const res = await this.fetchImpl(url, { credentials: this.credentials, ...init, headers });
      if (res.status !== 401 || tries > 0 || !this.getToken) return res;
    }
  }

  // --- connection -------------------------------------------------------------------------

  _scheduleSync() {
    if (this._debounce !== null || this._closed) return;
    this._debounce = setTimeout(() => {
      this._debounce = null;
      this._sync();
    }, this.debounceMs);
  }

  _sync() {
    if (this._closed) return;
    if (this._share && !this._share.holding) return this._share.announce();
    const topics = this.topics;
    if (topics.length === 0) {
      this._clearTimer();
      this._abort();
      this._setStatus("idle");
      return;
    }
    if (this._paused || this._offline || this._timer !== null) return;
    if (this._conn && this._conn.key === topics.join("\n")) {
      this._floor = null; // the stream already carries every tab's topics: nothing to replay
      return;
    }
    this._abort();
    this._connect();
  }

  async _connect() {
    if (this._share && !this._share.holding) return;
    this._clearTimer();
    this._abort();
    if (this._closed || this._paused || this._offline || this._frozen) return;
    const gen = ++this._gen;
    const controller = new AbortController();
    const conn = { gen, controller, key: "", delivered: false, authExpired: false, retryMs: 0 };
    this._conn = conn;
    this._started = true;
    this._setStatus("connecting");
    let token = null;
    if (this.getToken) {
      try {
        token = await this.getToken();
      } catch (error) {
        if (gen === this._gen) this._fail({ status: "unauthorized", error });
        return;
      }
      if (gen !== this._gen) return;
      // Refused topics are asked for again only under a new grant, not merely a new token
      // (a getToken that mints on every call would otherwise loop on the same 403).
      const grant = grantOf(token);
      if (grant !== this._grant) this._denied.clear();
      this._grant = grant;
    }
    const topics = this.topics;
    if (topics.length === 0) {
      this._conn = null;
      this._setStatus(this._subs.size ? "unauthorized" : "idle");
      return;
    }
    conn.key = topics.join("\n");
    conn.topics = topics;
    const query = topics.map((t) => "topic=" + encodeURIComponent(t));
    query.push("envelope=1");
    if (this._floor !== null && (this._cursor === null || !isPosition(this._cursor)
        || BigInt(this._floor) < BigInt(this._cursor))) {
      this._cursor = this._floor;
    }
    this._floor = null;
    if (this._cursor !== null) query.push("last_event_id=" + encodeURIComponent(this._cursor));
    const headers = { Accept: "text/event-stream" };
    if (token) headers.Authorization = "Bearer " + token;
    this._armWatchdog(conn);
    let res;
    try {
      res = await this.fetchImpl(this.url + "/events?" + query.join("&"), {
        headers, credentials: this.credentials, signal: controller.signal, cache: "no-store",
      });
    } catch (error) {
      if (gen === this._gen) this._fail({ error });
      return;
    }
    if (gen !== this._gen) return discard(res);
    const type = (res.headers.get("content-type") || "").split(";")[0].trim().toLowerCase();
    if (res.status === 200 && type === "text/event-stream" && res.body) {
      await this._read(conn, res);
      return;
    }
    clearTimeout(this._watchdog);
    const body = await readError(res);
    if (gen !== this._gen) return;
    const error = { status: res.status, code: body?.error?.code, message: body?.error?.message || `HTTP ${res.status}` };
    if (res.status === 401) {
      this._authFailures += 1;
      this._emit("error", error);
      // The first 401 fetches a fresh token at once; more in a row back off, unauthorized.
      if (this._authFailures === 1 && this.getToken) {
        this._conn = null;
        queueMicrotask(() => this._connect());
      } else {
        this._fail({ status: "unauthorized", error });
      }
      return;
    }
    if (res.status === 403) {
      const named = Array.isArray(body?.error?.topics) ? body.error.topics.filter((t) => topics.includes(t)) : [];
      const denied = named.length ? named : topics;
      for (const t of denied) this._denied.add(t);
      const hit = [...this._subs].filter((s) => s.topics.some((t) => denied.includes(t)));
      this._report(hit, { ...error, topics: denied });
      this._emit("error", { ...error, topics: denied });
      this._conn = null;
      if (this.topics.length) queueMicrotask(() => this._connect());
      else this._setStatus("unauthorized", { error });
      return;
    }
    const floor = res.status === 429 || res.status === 503 ? retryAfterMs(res.headers.get("retry-after")) : 0;
    this._fail({ error: type !== "text/event-stream" && res.status === 200 ? { ...error, message: "not an event stream: " + type } : error, floorMs: floor });
  }

  async _read(conn, res) {
    this.stats.connections += 1;
    this._authFailures = 0;
    this._setStatus("open");
    const parser = createParser({
      onEvent: (frame) => this._onFrame(conn, frame),
      onRetry: (ms) => { conn.retryMs = ms; },
      onComment: () => this._delivered(conn),
    });
    const decoder = new TextDecoder();
    const reader = res.body.getReader();
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (conn.gen !== this._gen) return;
        if (done) break;
        this._armWatchdog(conn);
        parser.feed(decoder.decode(value, { stream: true }));
        if (conn.gen !== this._gen) return;
      }
    } catch (error) {
      if (conn.gen === this._gen) this._fail({ error, floorMs: conn.retryMs });
      return;
    } finally {
      reader.releaseLock?.();
    }
    if (conn.gen !== this._gen) return;
    // The server ended the stream (STREAM_MAX_SECONDS, shutdown, a proxy): resume after its
    // retry:, with a backoff step only if the stream delivered nothing. (The retry: of a
    // stream floors the reconnect after that stream only: a draining replica's long retry:
    // must not slow the reconnects to its replacement.)
    this._fail({ error: { message: "stream ended" }, floorMs: conn.retryMs });
  }

  _onFrame(conn, frame) {
    this._delivered(conn);
    const type = frame.event || "message";
    let payload;
    try {
      payload = JSON.parse(frame.data);
    } catch {
      payload = frame.data;
    }
    let topic = null;
    let data = payload;
    if (isEnvelope(payload)) {
      topic = payload.topic;
      data = payload.data;
    } else if (payload && typeof payload === "object") {
      // A server without envelope=1: the topic of a change or an invalidation is in its data.
      if (typeof payload.topic === "string") topic = payload.topic;
      else if (type === "aggregate.invalidated" && typeof payload.aggregate === "string") topic = "aggregates/" + payload.aggregate;
    }
    const id = frame.id === undefined || frame.id === "" ? null : frame.id;
    if (id !== null && (type === "reset" || !isPosition(id) || !isPosition(this._cursor ?? "")
        || BigInt(id) > BigInt(this._cursor))) {
      this._cursor = id;
    }
    const event = { id, type, topic, data };
    if (type === "auth_expired") {
      // Fetch a fresh token and resume from the last id, at once.
      conn.authExpired = true;
      this._emit("error", { status: 401, code: "auth_expired", message: "token expired" });
      this._abort();
      queueMicrotask(() => this._connect());
      return;
    }
    // The holding tab passes every event on (the other tabs drop what they already have).
    // With the connection's topics: a tab whose topics it does not all cover must not move
    // its position on it (the events of its other topics were not in this stream).
    this._share?.relay("event", { event, topics: conn.topics });
    this._deliver(event);
  }

  /** Deliver one event to this tab: each id once, in order; only this tab's topics. */
  _deliver(event) {
    const { id, type, topic, data } = event;
    if (id !== null) {
      if (type !== "reset" && this.lastEventId !== null && isPosition(id) && isPosition(this.lastEventId)
          && BigInt(id) <= BigInt(this.lastEventId)) {
        return; // already delivered (a proxy, a replica or another tab's catch-up replayed it): exactly once
      }
      this.lastEventId = id;
    }
    if (this._share && type !== "reset" && topic !== null
        && ![...this._subs].some((sub) => sub.topics.some((t) => eventReaches(t, topic, type, data)))) {
      return; // another tab's topic, on the shared stream
    }
    this.stats.events += 1;
    this._emit("event", event);
    if (type === "reset") this._emit("reset", event);
    for (const sub of [...this._subs]) {
      if (!this._subs.has(sub)) continue;
      if (type !== "reset") {
        if (topic !== null && !sub.topics.some((t) => eventReaches(t, topic, type, data))) continue;
        if (sub.types && !sub.types.some((p) => typeMatches(p, type))) continue;
      }
      safely(sub.handler, event);
    }
  }

  _delivered(conn) {
    if (conn.delivered || conn.gen !== this._gen) return;
    conn.delivered = true;
    this._attempt = 0;
    if (this.degraded) {
      this.degraded = false;
      this._setStatus("open", {}, true);
    }
  }

  _fail({ status = "backoff", error = null, floorMs = 0 }) {
    this._abort();
    this.stats.failures += 1;
    const attempt = this._attempt;
    this._attempt += 1;
    if (this._attempt >= this.degradeAfter) this.degraded = true;
    const floor = floorMs || 0;
    const delayMs = backoffDelay(attempt, floor, this.backoff);
    this._clearTimer();
    this._timer = setTimeout(() => {
      this._timer = null;
      this._connect();
    }, delayMs);
    this._setStatus(status, { attempt: this._attempt, delayMs, floorMs: floor, error });
  }

  _armWatchdog(conn) {
    clearTimeout(this._watchdog);
    if (!(this.heartbeatTimeoutMs > 0) || !Number.isFinite(this.heartbeatTimeoutMs)) return;
    this._watchdog = setTimeout(() => {
      if (conn.gen === this._gen) this._fail({ error: { message: `no bytes for ${this.heartbeatTimeoutMs} ms` } });
    }, this.heartbeatTimeoutMs);
  }

  _abort() {
    clearTimeout(this._watchdog);
    this._watchdog = null;
    if (this._conn) {
      this._conn.controller.abort();
      this._conn = null;
    }
    this._gen += 1;
  }

  _clearTimer() {
    if (this._timer !== null) clearTimeout(this._timer);
    this._timer = null;
  }

  _setStatus(status, info = {}, force = false) {
    if (status === this.status && !force && status !== "backoff" && status !== "unauthorized") return;
    this.status = status;
    this._emit("status", status, { degraded: this.degraded, ...info });
  }

  _emit(name, ...args) {
    if (name === "status") this._share?.relay("status", { status: args[0], info: cloneable(args[1]) });
    if (name === "error") this._share?.relay("error", { error: cloneable(args[0]) });
    const set = this._listeners.get(name);
    if (!set) return;
    for (const fn of [...set]) safely(fn, ...args);
  }

  _report(subs, error) {
    for (const sub of subs) if (sub.onError) safely(sub.onError, error);
  }

  // --- tabs (tabs.js calls these) --------------------------------------------------------

  /** This tab now holds the stream: connect from its last id with every tab's topics. */
  _holdStream() {
    if (this._closed) return;
    this._cursor = this.lastEventId;
    this._attempt = 0;
    this._abort();
    this._clearTimer();
    this._scheduleSync();
  }

  /** A tab is behind `position`: reconnect from there if the stream is further on. */
  _rewind(position) {
    if (!isPosition(position)) return;
    // Kept until the next connection: this one (without the tab's topics) may still read
    // events and move the cursor past `position` before the union reconnects.
    if (this._floor === null || BigInt(position) < BigInt(this._floor)) this._floor = position;
    if (this._cursor !== null && isPosition(this._cursor) && BigInt(position) >= BigInt(this._cursor)) return;
    this._cursor = position;
    if (this._conn || this.status === "open") {
      this._abort();
      this._clearTimer();
      this._scheduleSync();
    }
  }

  /** The tabs' topics or visibility changed: follow the union; a visible tab wakes a paused stream. */
  _peersChanged(visible) {
    if (visible && this._paused) {
      clearTimeout(this._hiddenTimer);
      this._paused = false;
      return this._resume();
    }
    this._scheduleSync();
  }

  /**
   * The holding tab's status, in this tab. (A new tab keeps no position until its first event,
   * as a client of its own would, so that seed() from a snapshot still replays for it.)
   */
  _mirrorStatus(status, info) {
    if (this._closed) return;
    this.degraded = Boolean(info.degraded);
    this._setStatus(status, info);
  }

  /** An error the holding tab met; a 403 names the topics refused to this tab's subscriptions too. */
  _mirrorError(error) {
    if (error.status === 403 && Array.isArray(error.topics)) {
      for (const t of error.topics) this._denied.add(t);
      this._report([...this._subs].filter((s) => s.topics.some((t) => error.topics.includes(t))), error);
    }
    this._emit("error", error);
  }

  // --- page lifecycle: offline/online, hidden tabs, back/forward cache --------------------

  _watchEnvironment(options) {
    const win = options.window ?? (typeof window !== "undefined" ? window : null);
    const doc = options.document ?? (typeof document !== "undefined" ? document : null);
    const removers = [];
    const listen = (target, name, fn) => {
      if (!target || typeof target.addEventListener !== "function") return;
      target.addEventListener(name, fn);
      removers.push(() => target.removeEventListener(name, fn));
    };
    const nav = options.navigator ?? (typeof navigator !== "undefined" ? navigator : null);
    if (nav && nav.onLine === false) this._offline = true;
    listen(win, "offline", () => {
      this._offline = true;
      this._clearTimer();
      this._abort();
      this._setStatus("offline");
    });
    listen(win, "online", () => {
      if (!this._offline) return;
      this._offline = false;
      this._attempt = 0;
      this._resume();
    });
    const hideAfter = this.pauseWhenHiddenAfterMs;
    if (doc && hideAfter !== null && hideAfter !== false && Number.isFinite(hideAfter)) {
      const onVisibility = () => {
        // The holder pauses only when no tab is visible: tell it about this one either way.
        if (this._share && !this._share.holding) this._share.announce();
        if (doc.visibilityState === "hidden" || doc.hidden === true) {
          clearTimeout(this._hiddenTimer);
          this._hiddenTimer = setTimeout(() => {
            if (this._closed || (this._share && (!this._share.holding || this._share.anyPeerVisible()))) return;
            this._paused = true;
            this._clearTimer();
            this._abort();
            this._setStatus("paused");
          }, hideAfter);
        } else {
          clearTimeout(this._hiddenTimer);
          this._hiddenTimer = null;
          if (this._paused) {
            this._paused = false;
            this._resume();
          }
        }
      };
      listen(doc, "visibilitychange", onVisibility);
    }
    // Back/forward cache: Chromium evicts a page whose open stream keeps receiving while it is
    // cached (NetworkExceedsBufferLimit), and a page holding a Web Lock or an open
    // BroadcastChannel may not be cached at all. So pagehide closes the stream and leaves the
    // tab group; pageshow (persisted: restored from the cache) reconnects at once from the last id.
    listen(win, "pagehide", () => {
      if (this._closed) return;
      this._frozen = true;
      this._clearTimer();
      this._abort();
      this._share?.leave();
    });
    listen(win, "pageshow", (event) => {
      if (this._closed || !this._frozen || !event.persisted) return;
      this._frozen = false;
      this._attempt = 0;
      if (this._share) return this._share.join();
      this._resume();
    });
    if (this._offline) this.status = "offline";
    return () => removers.forEach((remove) => remove());
  }

  _resume() {
    if (this._closed || this._paused || this._offline) return;
    if (this.topics.length === 0) return this._setStatus("idle");
    this._connect();
  }
}

/** What a token grants: a JWT's `topics` claim (as JSON), else the token itself. */
function grantOf(token) {
  const payload = typeof token === "string" ? token.split(".")[1] : undefined;
  if (payload === undefined) return token;
  try {
    const bytes = Uint8Array.from(atob(payload.replace(/-/g, "+").replace(/_/g, "/")), (c) => c.charCodeAt(0));
    return JSON.stringify(JSON.parse(new TextDecoder().decode(bytes))?.topics ?? null);
  } catch {
    return token;
  }
}

/** `value` as a message can carry it (errors reduced to their fields). */
function cloneable(value) {
  if (!value || typeof value !== "object") return value;
  const out = {};
  for (const [k, v] of Object.entries(value)) {
    out[k] = v instanceof Error ? { name: v.name, message: v.message } : v;
  }
  return out;
}

function isEnvelope(value) {
  if (!value || typeof value !== "object" || Array.isArray(value)) return false;
  const keys = Object.keys(value);
  return keys.length === 2 && "topic" in value && "data" in value
    && (value.topic === null || typeof value.topic === "string");
}

function isPosition(id) {
  return /^\d{1,19}$/.test(id) && BigInt(id) <= MAX_POSITION;
}

function retryAfterMs(header) {
  if (!header) return 0;
  const seconds = Number(header);
  if (Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
  const date = Date.parse(header);
  return Number.isNaN(date) ? 0 : Math.max(0, date - Date.now());
}

async function readError(res) {
  try {
    const text = await res.text();
    return text ? JSON.parse(text) : null;
  } catch {
    return null;
  }
}

function discard(res) {
  try {
    res.body?.cancel?.();
  } catch {
    // nothing to release
  }
}

function safely(fn, ...args) {
  try {
    fn(...args);
  } catch (error) {
    if (typeof globalThis.reportError === "function") globalThis.reportError(error);
    else setTimeout(() => { throw error; });
  }
}
