/** Chunked transfers (device_runtime/protocol/chunking.py is the source): split an envelope under the
 * broker's packet limit; reassemble chunks, checking each chunk's and the whole transfer's sha256. */
import { type ChunkInfo, type Envelope, EnvelopeError, encodedSize, PREFIX_BYTES } from "./envelope.js";
import { sha256Hex, utf8 } from "./hash.js";

/** What an MQTT PUBLISH adds around a payload besides the topic (same figure as the Python side). */
export const MQTT_PUBLISH_OVERHEAD = 64;
const HEADER_SLACK = 32;

export function payloadBudget(maxPacketSize: number, topic: string): number {
  return maxPacketSize - utf8.encode(topic).length - MQTT_PUBLISH_OVERHEAD;
}

function chunkOf(msg: Envelope, info: ChunkInfo, part: Uint8Array): Envelope {
  return { header: { ...msg.header, chunk: info, sha256: sha256Hex(part), length: part.length }, body: part };
}

/** ``msg`` alone if it fits ``maxPayload``, else chunk envelopes that each do. */
export function split(msg: Envelope, maxPayload: number, transfer?: string): Envelope[] {
  if (encodedSize(msg) <= maxPayload) return [msg];
  const body = msg.body;
  const total = sha256Hex(body);
  const tid = transfer ?? msg.header.key;
  const probe = (count: number) =>
    encodedSize(chunkOf(msg, { transfer: tid, index: count - 1, count, total_length: body.length, total_sha256: total },
      new Uint8Array(0))) - PREFIX_BYTES;
  let count = 1;
  let per = 0;
  for (let i = 0; i < 8; i++) {
    per = maxPayload - PREFIX_BYTES - probe(count) - HEADER_SLACK;
    if (per < 256) throw new EnvelopeError(`a payload limit of ${maxPayload} bytes leaves no room for chunk bodies`);
    const next = Math.max(1, Math.ceil(body.length / per));
    if (next === count) break;
    count = next;
  }
  const out: Envelope[] = [];
  for (let i = 0; i < count; i++) {
    const info = { transfer: tid, index: i, count, total_length: body.length, total_sha256: total };
    out.push(chunkOf(msg, info, body.subarray(i * per, (i + 1) * per)));
  }
  return out;
}

/** Collects the chunks of transfers (in memory); ``add`` returns the whole, verified message when complete. */
export class Reassembler {
  private parts = new Map<string, { info: ChunkInfo; head: Envelope["header"]; got: Map<number, Uint8Array> }>();

  add(env: Envelope): Envelope | null {
    const info = env.header.chunk;
    if (!info) return env;
    if (info.index >= info.count) throw new EnvelopeError(`chunk index ${info.index} out of range`);
    let t = this.parts.get(info.transfer);
    if (t && (t.info.count !== info.count || t.info.total_sha256 !== info.total_sha256)) t = undefined;
    if (!t) {
      t = { info, head: env.header, got: new Map() };
      this.parts.set(info.transfer, t);
    }
    t.got.set(info.index, env.body);
    if (t.got.size < info.count) return null;
    this.parts.delete(info.transfer);
    const body = new Uint8Array(info.total_length);
    let off = 0;
    for (let i = 0; i < info.count; i++) {
      const p = t.got.get(i)!;
      if (off + p.length > body.length) throw new EnvelopeError(`transfer ${info.transfer} is longer than announced`);
      body.set(p, off);
      off += p.length;
    }
    if (off !== info.total_length || sha256Hex(body) !== info.total_sha256) {
      throw new EnvelopeError(`transfer ${info.transfer} reassembled to a body that fails its sha256 check`);
    }
    return { header: { ...t.head, chunk: null, sha256: info.total_sha256, length: info.total_length }, body };
  }

  progress(transfer: string): [number, number] | null {
    const t = this.parts.get(transfer);
    return t ? [t.got.size, t.info.count] : null;
  }

  missing(transfer: string): number[] | null {
    const t = this.parts.get(transfer);
    if (!t) return null;
    const out: number[] = [];
    for (let i = 0; i < t.info.count; i++) if (!t.got.has(i)) out.push(i);
    return out;
  }
}
