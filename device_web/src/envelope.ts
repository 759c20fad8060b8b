/** The deft envelope (device_runtime/protocol/envelope.py is the source; tests/test_web_device.py checks
 * this file against envelopes Python wrote):  b"DEFT" | u32 BE header length | header JSON | body. */
import { fromUtf8, sha256Hex, utf8 } from "./hash.js";

export const PROTOCOL_VERSION = 1;
const MAGIC = [0x44, 0x45, 0x46, 0x54]; // "DEFT"
export const PREFIX_BYTES = 8;
const MAX_HEADER_BYTES = 64 * 1024;

export interface ChunkInfo {
  transfer: string;
  index: number;
  count: number;
  total_length: number;
  total_sha256: string;
}

export interface Header {
  v: number;
  type: string;
  sender: string;
  fleet: string;
  round?: number | null;
  key: string;
  sha256: string;
  length: number;
  content: "safetensors" | "json" | "bytes";
  chunk?: ChunkInfo | null;
  ts: number;
  meta: Record<string, unknown>;
}

export interface Envelope {
  header: Header;
  body: Uint8Array;
}

export class EnvelopeError extends Error {}

export function newKey(): string {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

export function build(
  type: string,
  opts: { sender: string; fleet: string; body?: Uint8Array; round?: number | null; key?: string;
    content?: Header["content"]; meta?: Record<string, unknown> },
): Envelope {
  const body = opts.body ?? new Uint8Array(0);
  const header: Header = {
    v: PROTOCOL_VERSION, type, sender: opts.sender, fleet: opts.fleet, round: opts.round ?? null,
    key: opts.key ?? newKey(), sha256: sha256Hex(body), length: body.length, content: opts.content ?? "bytes",
    chunk: null, ts: Date.now() / 1000, meta: opts.meta ?? {},
  };
  return { header, body };
}

/** A JSON body message (hello, heartbeat, status, bundle-request, ...), compact like pydantic's dump. */
export function jsonMessage(type: string, obj: unknown, opts: { sender: string; fleet: string; round?: number | null; key?: string }): Envelope {
  return build(type, { ...opts, body: utf8.encode(JSON.stringify(obj)), content: "json" });
}

/** Header JSON without null fields (Python: ``model_dump_json(exclude_none=True)``). */
function headerJson(h: Header): string {
  return JSON.stringify(h, (_k, v) => (v === null ? undefined : v));
}

export function encode(env: Envelope): Uint8Array {
  const head = utf8.encode(headerJson(env.header));
  if (head.length > MAX_HEADER_BYTES) throw new EnvelopeError(`envelope header is ${head.length} bytes`);
  const out = new Uint8Array(PREFIX_BYTES + head.length + env.body.length);
  out.set(MAGIC, 0);
  new DataView(out.buffer).setUint32(4, head.length, false);
  out.set(head, PREFIX_BYTES);
  out.set(env.body, PREFIX_BYTES + head.length);
  return out;
}

export function encodedSize(env: Envelope): number {
  return PREFIX_BYTES + utf8.encode(headerJson(env.header)).length + env.body.length;
}

/** Parse and verify (magic, version, lengths, the body's sha256); throws EnvelopeError naming the problem. */
export function decode(data: Uint8Array): Envelope {
  if (data.length < PREFIX_BYTES) throw new EnvelopeError(`message of ${data.length} bytes is not a deft envelope`);
  for (let i = 0; i < 4; i++) {
    if (data[i] !== MAGIC[i]) throw new EnvelopeError("not a deft envelope (bad magic)");
  }
  const n = new DataView(data.buffer, data.byteOffset, data.byteLength).getUint32(4, false);
  if (n > MAX_HEADER_BYTES || PREFIX_BYTES + n > data.length) throw new EnvelopeError("envelope header truncated");
  let header: Header;
  try {
    header = JSON.parse(fromUtf8.decode(data.subarray(PREFIX_BYTES, PREFIX_BYTES + n))) as Header;
  } catch {
    throw new EnvelopeError("envelope header is not JSON");
  }
  if (header.v !== PROTOCOL_VERSION) {
    throw new EnvelopeError(`message is protocol v${header.v}; this page speaks v${PROTOCOL_VERSION}`);
  }
  const body = data.subarray(PREFIX_BYTES + n);
  if (body.length !== header.length) {
    throw new EnvelopeError(`${header.type} message from ${header.sender}: body has ${body.length} of ${header.length} bytes`);
  }
  if (sha256Hex(body) !== header.sha256) {
    throw new EnvelopeError(`${header.type} message from ${header.sender} (key ${header.key}) fails its sha256 check`);
  }
  return { header, body };
}
