// Types for tabs.js: the tabs of one origin sharing one stream (used by index.js).
import type { PgsseClient } from "./index.js";

/** Whether this host has Web Locks, BroadcastChannel and a page (sharing is on by default there). */
export declare function canShareTabs(env?: { navigator?: unknown; window?: unknown; BroadcastChannel?: unknown }): boolean;

export declare class TabGroup {
  constructor(client: PgsseClient, options: {
    name: string;
    locks: LockManager;
    BroadcastChannel?: typeof BroadcastChannel;
    visible?: () => boolean;
  });
  /** True while this tab holds the stream. */
  readonly holding: boolean;
  readonly joined: boolean;
  join(): void;
  leave(): void;
  announce(since?: string | null): void;
  peerTopics(): Set<string>;
  anyPeerVisible(): boolean;
  relay(kind: string, payload: object): void;
  requestReconnect(): void;
}
