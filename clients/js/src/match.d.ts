export { topicCovers, typeMatches } from "./index.js";
