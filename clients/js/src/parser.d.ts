export { createParser, ParsedEvent } from "./index.js";
