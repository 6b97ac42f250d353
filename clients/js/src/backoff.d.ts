export { backoffCeiling, backoffDelay, DEFAULT_BACKOFF } from "./index.js";
