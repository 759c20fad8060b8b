// Checks the page's wire-format modules against fixtures Python wrote (tests/test_web_protocol.py):
// node test/golden.mjs DIR  reads DIR/in.json (+ .bin files), writes DIR/out.json (+ .bin files).
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { bundle, chunking, envelope, payload, Topics } from "../dist/node/protocol.mjs";

const dir = process.argv[2];
const spec = JSON.parse(readFileSync(join(dir, "in.json"), "utf8"));
const read = (name) => new Uint8Array(readFileSync(join(dir, name)));
const out = { envelopes: {}, refused: {}, topics: {}, bundle_hash: null };

// envelopes Python encoded: decode each; reassemble the chunked transfer
for (const name of spec.envelopes) {
  const env = envelope.decode(read(name));
  out.envelopes[name] = { header: env.header, body_sha256: (await import("node:crypto")).createHash("sha256").update(env.body).digest("hex") };
}
const r = new chunking.Reassembler();
let whole = null;
for (const name of spec.chunks) whole = r.add(envelope.decode(read(name))) ?? whole;
out.reassembled = whole && { header: whole.header, length: whole.body.length };
for (const name of spec.tampered) {
  try { envelope.decode(read(name)); out.refused[name] = null; } catch (e) { out.refused[name] = e.message; }
}
// topics for the same ids
const t = new Topics(spec.fleet);
out.topics = { hello: t.hello(spec.device), update: t.update(spec.device, 7), bundle_request: t.bundleRequest(spec.device),
  ack_to: t.ackTo(spec.device), global: t.globalState(), status: t.status(spec.device), heartbeat: t.heartbeat(spec.device) };
out.bundle_hash = bundle.bundleHash(spec.files);
// payloads from the given tensors, in every encoding, full and delta
const tensors = new Map(Object.entries(spec.tensors).map(([k, v]) => [k, { shape: v.shape, values: Float32Array.from(v.values) }]));
const base = new Map(Object.entries(spec.base).map(([k, v]) => [k, Float32Array.from(v)]));
for (const enc of payload.ENCODINGS) {
  for (const kind of ["full", "delta"]) {
    const blob = payload.encodeUpdate({ bundleHash: spec.bundle_hash, deviceId: spec.device, round: 3, samples: 40,
      metrics: { steps: 3, final_train_loss: payload.metricValue(0.6931471805599453), median_step_s: payload.metricValue(0.0123456789) },
      encoding: enc, tensors, base: kind === "delta" ? base : undefined });
    writeFileSync(join(dir, `payload-${enc}-${kind}.bin`), blob);
  }
}
// a JSON message and a chunked update the page would send
const hello = envelope.jsonMessage("hello", { kit_version: "web", profile: { board: "browser" }, bundles: [],
  capabilities: { backend: "ort-web" } }, { sender: spec.device, fleet: spec.fleet });
writeFileSync(join(dir, "js-hello.deft"), envelope.encode(hello));
const big = envelope.build("update", { sender: spec.device, fleet: spec.fleet, round: 3, body: read("payload-fp32-full.bin"),
  content: "safetensors", key: "k-js" });
const parts = chunking.split(big, 900);
parts.forEach((p, i) => writeFileSync(join(dir, `js-chunk-${i}.deft`), envelope.encode(p)));
out.js_chunks = parts.length;
writeFileSync(join(dir, "out.json"), JSON.stringify(out));
