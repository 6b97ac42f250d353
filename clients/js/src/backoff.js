// Full-jitter exponential backoff ("Exponential Backoff And Jitter", AWS Architecture Blog):
// attempt n waits a uniform random time in [0, min(maxMs, initialMs * 2^n)], raised to the
// floor the server asked for (`Retry-After`, the stream's `retry:`) and never below minMs,
// so a run of instant failures can never become a zero-delay loop.

export const DEFAULT_BACKOFF = Object.freeze({
  initialMs: 1000,
  maxMs: 32000,
  minMs: 100,
  random: Math.random,
});

/**
 * The ceiling of the jitter window for `attempt` (0-based).
 * @param {number} attempt
 * @param {{initialMs: number, maxMs: number}} options
 */
export function backoffCeiling(attempt, options) {
  return Math.min(options.maxMs, options.initialMs * 2 ** Math.min(attempt, 30));
}

/**
 * The delay before reconnect number `attempt` (0-based).
 * @param {number} attempt
 * @param {number} floorMs the server's floor (`Retry-After`, `retry:`), 0 when none
 * @param {Partial<typeof DEFAULT_BACKOFF>} [options]
 */
export function backoffDelay(attempt, floorMs = 0, options = {}) {
  const o = { ...DEFAULT_BACKOFF, ...options };
  const jittered = o.random() * backoffCeiling(attempt, o);
  return Math.round(Math.max(o.minMs, floorMs || 0, jittered));
}
