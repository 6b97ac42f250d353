// pgsse for React ≥ 18 (peer dependency): hooks that are safe under StrictMode — its
// mount/unmount/mount churn lands inside the client's debounce, so it opens one connection.

import { useEffect, useRef, useSyncExternalStore } from "react";
import { connectQueryClient } from "./tanstack-query.js";

/** Call `handler` for each event on `topics` while the component is mounted. */
export function useSubscription(rt, topics, handler, options = {}) {
  const latest = useRef({ handler, options });
  useEffect(() => {
    latest.current = { handler, options };
  });
  const list = Array.isArray(topics) ? topics : [topics];
  const key = JSON.stringify([list, options.types || null]);
  useEffect(() => {
    if (!rt || list.length === 0) return undefined;
    return rt.subscribe(list, (event) => latest.current.handler(event), {
      types: options.types,
      onError: (error) => latest.current.options.onError?.(error),
    });
    // eslint-disable-next-line react-hooks/exhaustive-deps -- `key` stands for topics and types
  }, [rt, key]);
}

/** The client's status (`open`, `backoff`, `paused`, …), re-rendering when it changes. */
export function useConnectionStatus(rt) {
  return useSyncExternalStore(
    (onChange) => rt.on("status", onChange),
    () => rt.status,
    () => rt.status,
  );
}

/** connectQueryClient for the lifetime of the component (options read once per topics/map change). */
export function useQueryInvalidation(rt, queryClient, options = {}) {
  const latest = useRef(options);
  useEffect(() => {
    latest.current = options;
  });
  const key = JSON.stringify([options.topics || [], Object.keys(options.map || {}), options.batchMs]);
  useEffect(() => {
    if (!rt || !queryClient) return undefined;
    const current = latest.current;
    return connectQueryClient(rt, queryClient, {
      ...current,
      onReset: (event) => latest.current.onReset?.(event),
    });
    // eslint-disable-next-line react-hooks/exhaustive-deps -- `key` stands for the options
  }, [rt, queryClient, key]);
}
