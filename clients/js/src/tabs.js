// One stream per browser: the tabs of one origin that create a client for the same service URL
// share one /events connection instead of one each (over HTTP/1.1 a browser holds 6 connections
// per origin: the seventh tab's stream would wait forever).
//
// - Web Locks elect the holding tab: every tab asks for the lock `pgsse:<url>`; the one that gets
//   it holds the stream with the union of every tab's topics. The browser releases a lock when
//   its tab closes, navigates or crashes, so the next tab in line takes over at once and resumes
//   from its last id (every tab saw the same events, so its last id is the stream's).
// - BroadcastChannel `pgsse:<url>` carries the rest: each tab announces its topics ("tab"); the
//   holder relays every event it reads ("event"), its status and errors; each tab delivers to its
//   own subscriptions and drops ids at or below its own last id, so a replay is seen once.
// - A tab that is behind (restored from the back/forward cache, seeded from a snapshot, or behind
//   the new holder at a hand-over) announces `since`; a holder further on reconnects from there.
// - Each tab also holds a lock of its own, `pgsse:<url>#<tab>`, while it is in the group: the
//   holder drops the topics of tabs whose lock is gone (a crashed tab says no goodbye).
//
// The client (index.js) keeps subscriptions, dispatch and the connection; this module only
// decides whether this tab holds the connection and moves messages between tabs.

import { topicCovers } from "./match.js";

/** Whether the stream's `streamTopics` cover every one of `topics` (unknown: assume so). */
function coversAll(streamTopics, topics) {
  if (!Array.isArray(streamTopics)) return true;
  return topics.every((topic) => streamTopics.some((t) => topicCovers(t, topic)));
}

/** Whether this host has what sharing needs: Web Locks, BroadcastChannel and a page. */
export function canShareTabs(env = {}) {
  const nav = env.navigator ?? globalThis.navigator;
  const win = env.window ?? globalThis.window;
  return Boolean(win && nav && nav.locks && typeof nav.locks.request === "function"
    && typeof (env.BroadcastChannel ?? globalThis.BroadcastChannel) === "function");
}

/** The group of tabs sharing `client`'s stream; `join()` enters it, `leave()` leaves it. */
export class TabGroup {
  constructor(client, { name, locks, BroadcastChannel: Channel = globalThis.BroadcastChannel, visible = () => true }) {
    this.client = client;
    this.name = "pgsse:" + name;
    this.locks = locks;
    this.Channel = Channel;
    this.visible = visible;
    this.tab = Math.random().toString(36).slice(2) + Date.now().toString(36);
    /** True while this tab holds the stream. */
    this.holding = false;
    this.peers = new Map(); // tab → {topics, visible}
    this.channel = null;
    this.generation = 0;
    this._inGroup = false; // this tab's own lock is held: announcements may go out
    this._release = null;
    this._abort = null;
  }

  get joined() {
    return this.channel !== null;
  }

  /** Enter the group: announce this tab's topics (and `since`, when it must catch up). */
  join() {
    if (this.channel) return;
    const generation = ++this.generation;
    this.channel = new this.Channel(this.name);
    this.channel.onmessage = (message) => this._receive(message.data);
    const released = new Promise((resolve) => { this._release = resolve; });
    this._abort = new AbortController();
    const signal = this._abort.signal;
    const current = () => generation === this.generation && this.channel !== null;
    const ignore = () => {}; // an aborted request rejects: this tab left before its turn
    // Announce only once this tab's own lock is held, so the holder never prunes a newcomer.
    this.locks.request(`${this.name}#${this.tab}`, { signal }, () => {
      if (!current()) return undefined;
      this._inGroup = true;
      this.announce(this.client.lastEventId);
      return released;
    }).catch(ignore);
    this.locks.request(this.name, { signal }, () => {
      if (!current()) return undefined;
      this._take();
      return released;
    }).catch(ignore);
  }

  /** Leave the group (pagehide, close): say goodbye, release the locks, stop holding. */
  leave() {
    if (!this.channel) return;
    this._post({ kind: "bye", tab: this.tab });
    this.channel.close();
    this.channel = null;
    this._abort.abort();
    this._release();
    this.holding = false;
    this._inGroup = false;
    this.peers.clear();
  }

  /** Tell the other tabs this tab's topics and visibility; `since`: resume me from there. */
  announce(since = null) {
    if (!this._inGroup) return;
    this._post({ kind: "tab", tab: this.tab, topics: this.client.ownTopics(), visible: this.visible(), since });
  }

  /** The other tabs' topics (the holder streams them with its own). */
  peerTopics() {
    const topics = new Set();
    for (const peer of this.peers.values()) for (const topic of peer.topics) topics.add(topic);
    return topics;
  }

  anyPeerVisible() {
    return [...this.peers.values()].some((peer) => peer.visible);
  }

  /** Holder: pass what the stream brought to the other tabs. */
  relay(kind, payload) {
    if (this.holding) this._post({ kind, ...payload });
  }

  /** Follower: ask the holder to reconnect (client.reconnect() in a tab that does not hold). */
  requestReconnect() {
    this._post({ kind: "reconnect", tab: this.tab });
  }

  _take() {
    this.holding = true;
    this._post({ kind: "holder", tab: this.tab });
    this.client._holdStream();
    this._prune();
  }

  _receive(message) {
    if (!message || typeof message !== "object" || !this.channel) return;
    const client = this.client;
    switch (message.kind) {
      case "tab":
        this.peers.set(message.tab, { topics: Array.isArray(message.topics) ? message.topics : [], visible: Boolean(message.visible) });
        if (!this.holding) return;
        if (message.since !== null && message.since !== undefined) client._rewind(String(message.since));
        client._peersChanged(Boolean(message.visible));
        this._relayStatus();
        this._prune();
        return;
      case "bye":
        this.peers.delete(message.tab);
        if (this.holding) client._peersChanged(false);
        return;
      case "holder":
        // A new holder: tell it our topics and how far we got (it may be behind us, or ahead).
        if (!this.holding) this.announce(client.lastEventId);
        return;
      case "reconnect":
        if (this.holding) client.reconnect();
        return;
      case "event":
        // Only from a stream that carries every topic of this tab: a narrower one (the holder
        // before it reconnects with this tab's topics) would move this tab's last id past
        // events it never saw; the holder's reconnect replays them from this tab's `since`.
        // (`client.topics` of a follower: its own, less the ones refused to it.)
        if (!this.holding && coversAll(message.topics, client.topics)) client._deliver(message.event);
        return;
      case "status":
        if (!this.holding) client._mirrorStatus(message.status, message.info || {});
        return;
      case "error":
        if (!this.holding) client._mirrorError(message.error || {});
        return;
      default:
    }
  }

  _relayStatus() {
    const client = this.client;
    this.relay("status", { status: client.status, info: { degraded: client.degraded } });
  }

  /** Holder: forget tabs whose own lock is gone (crashed without a goodbye). */
  async _prune() {
    if (typeof this.locks.query !== "function") return;
    let snapshot;
    try {
      snapshot = await this.locks.query();
    } catch {
      return;
    }
    const alive = new Set([...(snapshot.held || []), ...(snapshot.pending || [])].map((lock) => lock.name));
    let changed = false;
    for (const tab of [...this.peers.keys()]) {
      if (!alive.has(`${this.name}#${tab}`)) {
        this.peers.delete(tab);
        changed = true;
      }
    }
    if (changed && this.holding) this.client._peersChanged(false);
  }

  _post(message) {
    if (!this.channel) return;
    try {
      this.channel.postMessage(message);
    } catch {
      // Something in it does not clone (an exotic error object): send it as plain JSON.
      this.channel.postMessage(JSON.parse(JSON.stringify(message, (_, v) => (v instanceof Error ? { message: v.message } : v))));
    }
  }
}
