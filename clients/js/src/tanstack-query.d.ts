import type { PgsseClient, PgsseEvent } from "./index.js";

export type QueryKey = readonly unknown[];
export type MapValue = QueryKey | readonly QueryKey[] | ((event: PgsseEvent<any>) => QueryKey | readonly QueryKey[] | null | undefined | false);
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
export declare function keysFor(map: InvalidationMap, event: PgsseEvent): QueryKey[];
export declare function toKeys(value: unknown): QueryKey[];
export declare function hashKey(key: QueryKey): string;
