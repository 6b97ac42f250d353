// Types for pgsse's browser client (hand-written; the package has no build step).

export declare const VERSION: string;

export type Status =
  | "idle" | "connecting" | "open" | "backoff" | "paused" | "offline" | "unauthorized" | "closed";

export declare const STATUSES: readonly Status[];

/** One event as handlers receive it. */
export interface PgsseEvent<D = unknown> {
  /** The position (decimal string); null for `aggregate.invalidated`. */
  id: string | null;
  /** `orders.insert`, `payout.status.changed`, `aggregate.invalidated`, `reset`, … */
  type: string;
  /** The event's topic (`orders/42`, `aggregates/daily_sales`); null for `reset`. */
  topic: string | null;
  data: D;
}

/** A watched table's change, the `data` of `<table>.<op>` events. */
export interface RowChange<R = Record<string, unknown>> {
  topic: string;
  op: "insert" | "update" | "delete" | "truncate";
  table: string;
  row: R | null;
  old: R | null;
  ts: string;
  truncated?: boolean;
}

export interface StreamError {
  status?: number;
  code?: string;
  message: string;
  /** For a 403: the topics that were refused. */
  topics?: string[];
}

export interface BackoffOptions {
  /** First window (default 1000 ms); doubles per failed attempt. */
  initialMs?: number;
  /** Largest window (default 32000 ms). */
  maxMs?: number;
  /** Never wait less than this (default 100 ms). */
  minMs?: number;
  /** A [0, 1) random source (default Math.random). */
  random?: () => number;
}

export interface ClientOptions {
  /** The service's base URL, e.g. `https://rt.example.com` (default: same origin). */
  url?: string;
  /** Called before every connection and request; return a JWT or null. Cache inside it. */
  getToken?: () => string | null | undefined | Promise<string | null | undefined>;
  /** fetch credentials mode (default `same-origin`; `include` for a cross-origin cookie). */
  credentials?: RequestCredentials;
  /** Start from this position (e.g. a snapshot's `meta.position`); default: the present. */
  since?: string | number | bigint | null;
  backoff?: BackoffOptions;
  /** No bytes (heartbeats included) for this long → reconnect. Default 45000. */
  heartbeatTimeoutMs?: number;
  /** A tab hidden this long closes its stream (null: never). Default 60000. */
  pauseWhenHiddenAfterMs?: number | null;
  /** Subscription changes within this window cause one reconnect. Default 10. */
  debounceMs?: number;
  /** Failed connections in a row after which `degraded` is true (aggregate queries poll). Default 3. */
  degradeAfter?: number;
  fetch?: typeof fetch;
  /**
   * Share one stream among the tabs of this origin that use the same `url` (default true where
   * `navigator.locks` and `BroadcastChannel` exist; elsewhere each tab holds its own stream).
   */
  shareTabs?: boolean;
  /** For tests: the BroadcastChannel constructor tabs talk over (default the global one). */
  BroadcastChannel?: typeof BroadcastChannel;
  /** For tests and non-browser hosts: where `online`/`offline` and `visibilitychange` fire. */
  window?: EventTarget | null;
  document?: (EventTarget & { visibilityState?: string; hidden?: boolean }) | null;
  navigator?: { onLine?: boolean; locks?: LockManager } | null;
}

export interface SubscribeOptions {
  /** Event type patterns: exact, or with `*` wildcards (`bill.*`). Default: all. */
  types?: string[];
  /** Called when the server refuses one of this subscription's topics (403). */
  onError?: (error: StreamError) => void;
}

export interface StatusInfo {
  degraded: boolean;
  attempt?: number;
  delayMs?: number;
  /** The server's floor the delay respected (`retry:`, `Retry-After`). */
  floorMs?: number;
  error?: unknown;
}

export interface ClientEvents {
  status: (status: Status, info: StatusInfo) => void;
  event: (event: PgsseEvent) => void;
  reset: (event: PgsseEvent<{ reason: "history_expired" | "unknown_position" }>) => void;
  error: (error: StreamError) => void;
}

export declare class PgsseClient {
  constructor(options?: ClientOptions);
  readonly url: string;
  readonly status: Status;
  readonly degraded: boolean;
  readonly lastEventId: string | null;
  readonly topics: string[];
  /** `holder`: this tab holds the shared stream; `follower`: another tab does; `solo`: not shared. */
  readonly role: "holder" | "follower" | "solo";
  /** This tab's own subscriptions' topics (`topics` is the union the stream carries). */
  ownTopics(): string[];
  readonly stats: { connections: number; events: number; failures: number };
  subscribe<D = any>(
    topics: string | string[], handler: (event: PgsseEvent<D>) => void, options?: SubscribeOptions,
  ): () => void;
  on<K extends keyof ClientEvents>(name: K, listener: ClientEvents[K]): () => void;
  seed(position: string | number | bigint | null | undefined): void;
  reconnect(): void;
  close(): void;
  request(path: string, init?: RequestInit): Promise<Response>;
}

export declare function createClient(options?: ClientOptions): PgsseClient;
export { canShareTabs } from "./tabs.js";

export interface ParsedEvent {
  id: string | undefined;
  event: string | undefined;
  data: string;
}

export declare function createParser(handlers?: {
  onEvent?: (event: ParsedEvent) => void;
  onRetry?: (ms: number) => void;
  onComment?: (comment: string) => void;
}): { feed(chunk: string): void; reset(): void };

export declare const DEFAULT_BACKOFF: Readonly<Required<BackoffOptions>>;
export declare function backoffCeiling(attempt: number, options: { initialMs: number; maxMs: number }): number;
export declare function backoffDelay(attempt: number, floorMs?: number, options?: BackoffOptions): number;
export declare function topicCovers(topic: string, eventTopic: string): boolean;
/** `topicCovers`, or a table's TRUNCATE reaching a subscription below its topic. */
export declare function eventReaches(topic: string, eventTopic: string, type: string, data: unknown): boolean;
export declare function typeMatches(pattern: string, type: string): boolean;
