// Matching helpers shared by the client and the TanStack Query adapter.

/**
 * Whether a subscription to `topic` receives events on `eventTopic`: the same topic or one
 * below it, segment by segment (`orders` covers `orders/42`; `orders/4` does not).
 * @param {string} topic
 * @param {string} eventTopic
 */
export function topicCovers(topic, eventTopic) {
  return eventTopic === topic || eventTopic.startsWith(topic + "/");
}

/**
 * Whether a subscription to `topic` receives an event of type `type` on `eventTopic` with
 * `data`: `topicCovers`, and a watched table's TRUNCATE (`<table>.truncate`, data `op` is
 * "truncate") also reaches every subscription *below* its topic (`big/7` hears that `big`
 * was emptied), as the server delivers it.
 * @param {string} topic
 * @param {string} eventTopic
 * @param {string} type
 * @param {unknown} data
 */
export function eventReaches(topic, eventTopic, type, data) {
  if (topicCovers(topic, eventTopic)) return true;
  return type.endsWith(".truncate") && data !== null && typeof data === "object"
    && /** @type {{op?: unknown}} */ (data).op === "truncate" && topicCovers(eventTopic, topic);
}

const patternCache = new Map();

/**
 * Whether event type `type` matches `pattern`: exact, `*` alone matches everything, and a
 * `*` anywhere matches any run of characters (`bill.*` matches `bill.status.changed`).
 * @param {string} pattern
 * @param {string} type
 */
export function typeMatches(pattern, type) {
  if (pattern === "*" || pattern === type) return true;
  if (!pattern.includes("*")) return false;
  let re = patternCache.get(pattern);
  if (!re) {
    const source = pattern.split("*").map((part) => part.replace(/[.+?^${}()|[\]\\]/g, "\\$&")).join(".*");
    re = new RegExp("^" + source + "$");
    if (patternCache.size > 1000) patternCache.clear();
    patternCache.set(pattern, re);
  }
  return re.test(type);
}
