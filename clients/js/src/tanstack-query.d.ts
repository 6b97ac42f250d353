import type { PgsseClient, PgsseEvent } from "./index.js";

export type QueryKey = readonly unknown[];
/** A function of the event naming keys: a key or a list of keys. */
export type KeyFunction = (event: PgsseEvent<any>) => QueryKey | readonly QueryKey[] | null | false;
/** A list whose items are query keys or functions of the event returning a key or keys. */
export type KeyList = readonly (QueryKey | KeyFunction)[];
/**
 * A query key; a list of keys and/or functions of the event; or a function of the event returning
 * either (null or false: nothing this time). An array whose first item is an array or a function
 * is a list. Any other shape: a TypeError from connectQueryClient (or, for a function's return,
 * reported through `onError`).
 */
export type MapValue = QueryKey | KeyList | ((event: PgsseEvent<any>) => QueryKey | KeyList | null | false);
/** Event type (exact or with `*`) → query key(s), or a function of the event returning them. */
export type InvalidationMap = Record<string, MapValue>;

/** What connectQueryClient needs of a TanStack QueryClient. */
export interface InvalidatingClient {
  invalidateQueries(filters?: { queryKey?: QueryKey }): unknown;
}

export interface ConnectOptions {
  topics?: string[];
  map?: InvalidationMap;
  onReset?: (event: PgsseEvent<{ reason: string }>) => void;
  /** Collapse invalidations within this window (default 50 ms). */
  batchMs?: number;
  /** A map function returned a shape that is not a map value (default: `reportError`). */
  onError?: (error: TypeError, event: PgsseEvent) => void;
}

export declare function connectQueryClient(rt: PgsseClient, queryClient: InvalidatingClient, options?: ConnectOptions): () => void;

export interface AggregateBody<Row = Record<string, unknown>> {
  data: Row[];
  meta: { position: number | string; page?: number; limit?: number; total?: number; totalPages?: number; [k: string]: unknown };
}

export type AggregateParams = Record<string, string | number | boolean | null | undefined | string[]>;

export interface AggregateQueryOptions<Row> {
  queryKey: ["pgsse", "aggregate", string, AggregateParams];
  queryFn: (context?: { signal?: AbortSignal }) => Promise<AggregateBody<Row>>;
  refetchInterval: () => number | false;
}

export declare function aggregateQuery<Row = Record<string, unknown>>(
  rt: PgsseClient, name: string, params?: AggregateParams, options?: { pollMinMs?: number; pollMaxMs?: number },
): AggregateQueryOptions<Row>;

export declare function fetchAggregate<Row = Record<string, unknown>>(
  rt: PgsseClient, name: string, params?: AggregateParams, init?: RequestInit,
): Promise<AggregateBody<Row>>;

export declare function aggregateStats(rt: PgsseClient): { requests: number; notModified: number; changed: number };
export declare function aggregateKey(name: string, params?: AggregateParams): QueryKey;
export declare function keysFor(map: InvalidationMap, event: PgsseEvent, onError?: ((error: TypeError, event: PgsseEvent) => void) | null): QueryKey[];
export declare function toKeys(value: unknown, event?: PgsseEvent): QueryKey[];
/** Throw a TypeError unless `map` is an object of map values. */
export declare function checkMap(map: unknown): void;
export declare function checkMapValue(value: unknown, where?: string): void;
export declare function hashKey(key: QueryKey): string;
