/** The wire-format modules for Node (tests/test_web_protocol.py runs them against Python's fixtures). */
export * as envelope from "./envelope.js";
export * as chunking from "./chunking.js";
export * as payload from "./payload.js";
export * as safetensors from "./safetensors.js";
export * as bundle from "./bundle.js";
export { Topics } from "./topics.js";
