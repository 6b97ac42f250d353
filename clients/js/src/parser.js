// An incremental Server-Sent Events parser (WHATWG HTML, "Parsing an event stream").
//
// Feed it text chunks as they arrive, cut anywhere (inside a line, between CR and LF);
// it calls onEvent({id, event, data}) per dispatched event, onRetry(ms) per valid `retry:`
// and onComment(text) per comment line. `id` and `event` are the fields given in that
// event's block (undefined when absent), the same shape as the npm `eventsource-parser`;
// tracking the last id across events is the caller's job.

const LF = 10;
const CR = 13;
const SPACE = 32;

/**
 * @param {{onEvent?: (e: {id: string | undefined, event: string | undefined, data: string}) => void,
 *          onRetry?: (ms: number) => void, onComment?: (text: string) => void}} handlers
 */
export function createParser(handlers = {}) {
  const onEvent = handlers.onEvent || noop;
  const onRetry = handlers.onRetry || noop;
  const onComment = handlers.onComment || noop;
  let buffer = "";
  let first = true;
  let skipLF = false; // the previous chunk ended with CR: a leading LF completes that CRLF
  let id;
  let event;
  let data = "";
  let dataLines = 0;

  function dispatch() {
    if (dataLines > 0) onEvent({ id, event, data });
    id = undefined;
    event = undefined;
    data = "";
    dataLines = 0;
  }

  function line(text) {
    if (text === "") return dispatch();
    if (text.charCodeAt(0) === 58 /* : */) {
      onComment(text.charCodeAt(1) === SPACE ? text.slice(2) : text.slice(1));
      return;
    }
    const colon = text.indexOf(":");
    let field = text;
    let value = "";
    if (colon !== -1) {
      field = text.slice(0, colon);
      value = text.slice(colon + (text.charCodeAt(colon + 1) === SPACE ? 2 : 1));
    }
    switch (field) {
      case "data":
        data = dataLines === 0 ? value : data + "\n" + value;
        dataLines += 1;
        break;
      case "event":
        event = value || undefined;
        break;
      case "id":
        if (!value.includes("\0")) id = value;
        break;
      case "retry":
        if (/^\d+$/.test(value)) onRetry(parseInt(value, 10));
        break;
      default: // unknown fields are ignored
    }
  }

  function feed(chunk) {
    if (first && chunk.length > 0) {
      first = false;
      if (chunk.charCodeAt(0) === 0xfeff) chunk = chunk.slice(1);
    }
    if (skipLF && chunk.length > 0) {
      skipLF = false;
      if (chunk.charCodeAt(0) === LF) chunk = chunk.slice(1);
    }
    buffer += chunk;
    let start = 0;
    for (let i = 0; i < buffer.length; i++) {
      const c = buffer.charCodeAt(i);
      if (c !== LF && c !== CR) continue;
      line(buffer.slice(start, i));
      if (c === CR) {
        if (i + 1 === buffer.length) skipLF = true;
        else if (buffer.charCodeAt(i + 1) === LF) i += 1;
      }
      start = i + 1;
    }
    buffer = buffer.slice(start);
  }

  /** Forget any partial line and event (a new connection starts clean). */
  function reset() {
    buffer = "";
    first = true;
    skipLF = false;
    id = undefined;
    event = undefined;
    data = "";
    dataLines = 0;
  }

  return { feed, reset };
}

function noop() {}
