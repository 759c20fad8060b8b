/** safetensors read/write (https://huggingface.co/docs/safetensors): u64 LE header length, JSON header
 * (dtype, shape, data_offsets per tensor; __metadata__ strings), then the raw little-endian data. */
import { fromUtf8, utf8 } from "./hash.js";

export type DType = "F32" | "F16" | "I8" | "I32";
export interface Tensor {
  dtype: DType;
  shape: number[];
  data: Uint8Array; // raw little-endian bytes
}

export function f32(shape: number[], values: Float32Array): Tensor {
  return { dtype: "F32", shape, data: new Uint8Array(values.buffer, values.byteOffset, values.byteLength) };
}

export function asFloat32(t: Tensor): Float32Array {
  if (t.dtype !== "F32") throw new Error(`expected an F32 tensor, got ${t.dtype}`);
  const copy = t.data.slice();
  return new Float32Array(copy.buffer, 0, copy.byteLength / 4);
}

export function writeSafetensors(tensors: Map<string, Tensor>, metadata: Record<string, string>): Uint8Array {
  const header: Record<string, unknown> = {};
  let off = 0;
  const names = [...tensors.keys()].sort();
  for (const n of names) {
    const t = tensors.get(n)!;
    header[n] = { dtype: t.dtype, shape: t.shape, data_offsets: [off, off + t.data.length] };
    off += t.data.length;
  }
  header.__metadata__ = metadata;
  let head = utf8.encode(JSON.stringify(header));
  const pad = (8 - (head.length % 8)) % 8;
  if (pad) head = utf8.encode(JSON.stringify(header) + " ".repeat(pad));
  const out = new Uint8Array(8 + head.length + off);
  const dv = new DataView(out.buffer);
  dv.setBigUint64(0, BigInt(head.length), true);
  out.set(head, 8);
  let p = 8 + head.length;
  for (const n of names) {
    out.set(tensors.get(n)!.data, p);
    p += tensors.get(n)!.data.length;
  }
  return out;
}

export function readSafetensors(blob: Uint8Array): { tensors: Map<string, Tensor>; metadata: Record<string, string> } {
  const n = Number(new DataView(blob.buffer, blob.byteOffset, blob.byteLength).getBigUint64(0, true));
  if (n > blob.length - 8) throw new Error("safetensors header truncated");
  const header = JSON.parse(fromUtf8.decode(blob.subarray(8, 8 + n))) as Record<string, any>;
  const base = 8 + n;
  const tensors = new Map<string, Tensor>();
  for (const [k, v] of Object.entries(header)) {
    if (k === "__metadata__") continue;
    const [s, e] = v.data_offsets as [number, number];
    tensors.set(k, { dtype: v.dtype, shape: v.shape, data: blob.subarray(base + s, base + e) });
  }
  return { tensors, metadata: (header.__metadata__ ?? {}) as Record<string, string> };
}
