// Compiled by `tsc -p test/tsconfig.json` (noEmit): the declarations describe real usage.
import { createClient, type PgsseEvent, type RowChange, type Status } from "pgsse";
import { aggregateQuery, connectQueryClient, type InvalidationMap } from "pgsse/tanstack-query";
import { useConnectionStatus, useSubscription } from "pgsse/react";
import { QueryClient } from "@tanstack/query-core";

const rt = createClient({
  url: "https://rt.example.com",
  getToken: async () => "jwt",
  backoff: { initialMs: 500, maxMs: 10_000 },
  heartbeatTimeoutMs: 45_000,
  pauseWhenHiddenAfterMs: null,
});
const off: () => void = rt.subscribe<RowChange<{ id: number; status: string }>>(["orders/7"], (e) => {
  const status: string | undefined = e.data.row?.status;
  const id: string | null = e.id;
  void status; void id;
}, { types: ["orders.*"], onError: (err) => console.warn(err.topics) });
off();
rt.on("status", (s: Status, info) => { if (info.degraded) console.log(s, info.delayMs); });
rt.on("reset", (e) => { const reason: "history_expired" | "unknown_position" = e.data.reason; void reason; });

const map: InvalidationMap = {
  "bill.status.changed": [["bills"], ["bill-stats"]],
  "auction.item.*": (e: PgsseEvent<{ session_id: number }>) => [["sessions", { id: e.data.session_id }]],
};
const queryClient = new QueryClient();
const stop: () => void = connectQueryClient(rt, queryClient, { topics: ["bills"], map, batchMs: 20 });
stop();
const options = aggregateQuery<{ day: string; revenue: string }>(rt, "daily_sales", { store_id: 2 });
queryClient.fetchQuery(options).then((body) => body.data[0]?.revenue);

export function Badge(): string {
  useSubscription(rt, "orders", (e) => console.log(e.type));
  return useConnectionStatus(rt);
}

// The seed 000 map: a key and a function of the event in one list.
const seedMap: InvalidationMap = {
  "session.status.changed": [["sessions"], (e: PgsseEvent<{ sessionId: number }>) => ["sessions", { id: e.data.sessionId }]],
  "session.*": (e) => (e.data ? [["sessions"], () => [["x"], ["y"]]] : null),
};
connectQueryClient(rt, queryClient, { map: seedMap, onError: (error: TypeError) => console.error(error.message) });

const shared = createClient({ url: "https://rt.example.com", shareTabs: false });
const role: "holder" | "follower" | "solo" = shared.role;
const mine: string[] = shared.ownTopics();
void role; void mine;
