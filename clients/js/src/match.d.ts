export { eventReaches, topicCovers, typeMatches } from "./index.js";
