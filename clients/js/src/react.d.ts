import type { PgsseClient, PgsseEvent, Status, SubscribeOptions } from "./index.js";
import type { ConnectOptions, InvalidatingClient } from "./tanstack-query.js";

export declare function useSubscription<D = any>(
  rt: PgsseClient | null | undefined, topics: string | string[], handler: (event: PgsseEvent<D>) => void,
  options?: SubscribeOptions,
): void;
export declare function useConnectionStatus(rt: PgsseClient): Status;
export declare function useQueryInvalidation(
  rt: PgsseClient | null | undefined, queryClient: InvalidatingClient | null | undefined, options?: ConnectOptions,
): void;
