/** Update payloads (device_runtime/payload.py is the source): a safetensors blob whose metadata "deftkit"
 * holds the PayloadMeta JSON with a sha256 over that JSON and every tensor. The Python edge decodes it with
 * ``decode_update``; tests/test_web_device.py checks that on payloads this module wrote. */
import { sha256Stream, utf8 } from "./hash.js";
import { type Tensor, writeSafetensors } from "./safetensors.js";

export const ENCODINGS = ["fp32", "fp16", "int8", "int8-row"] as const;
export type Encoding = (typeof ENCODINGS)[number];

const NUMPY_DTYPE: Record<Tensor["dtype"], string> = { F32: "<f4", F16: "<f2", I8: "|i1", I32: "<i4" };

export interface UpdateArgs {
  bundleHash: string;
  deviceId: string;
  round: number;
  samples: number;
  metrics: Record<string, number>;
  encoding: Encoding;
  /** trained tensors by manifest name, and their shapes */
  tensors: Map<string, { shape: number[]; values: Float32Array }>;
  /** the tensors training started from: the payload is then their delta (kind "delta") */
  base?: Map<string, Float32Array>;
}

/** numpy's rint: round half to even. */
function rint(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

function toF16Bits(v: number): number {
  const f = new Float32Array([v]);
  const x = new Uint32Array(f.buffer)[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    if (rem > mid || (rem === mid && half & 1)) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && half & 1)) half++;
  e = half >>> 10;
  return sign | half;
}

function quantize(vals: Float32Array, rows: number): { q: Int8Array; scales: Float32Array } {
  const rowSize = vals.length / rows;
  const scales = new Float32Array(rows);
  const q = new Int8Array(vals.length);
  for (let r = 0; r < rows; r++) {
    let peak = 0;
    for (let i = r * rowSize; i < (r + 1) * rowSize; i++) peak = Math.max(peak, Math.abs(vals[i]));
    const s = peak > 0 ? Math.fround(Math.fround(peak) / 127.0) : 1.0;
    scales[r] = s;
    for (let i = r * rowSize; i < (r + 1) * rowSize; i++) {
      q[i] = Math.max(-127, Math.min(127, rint(Math.fround(vals[i] / scales[r]))));
    }
  }
  return { q, scales };
}

function bytes(a: ArrayBufferView): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

function pyShape(shape: number[]): string {
  return `[${shape.join(", ")}]`;
}

/** Python's ``_content_hash``: sha256(meta JSON, then per sorted tensor "\n{name}|{dtype}|{shape}|" + bytes). */
function contentHash(metaJson: string, tensors: Map<string, Tensor>): string {
  const h = sha256Stream();
  h.update(utf8.encode(metaJson));
  for (const k of [...tensors.keys()].sort()) {
    const t = tensors.get(k)!;
    h.update(utf8.encode(`\n${k}|${NUMPY_DTYPE[t.dtype]}|${pyShape(t.shape)}|`));
    h.update(t.data);
  }
  return h.hex();
}

/** The meta JSON exactly as pydantic writes PayloadMeta (field order, compact separators). */
function metaJson(a: UpdateArgs, contentSha: string): string {
  return JSON.stringify({
    format: "deftkit-update", version: 1, bundle_hash: a.bundleHash, device_id: a.deviceId, round: a.round,
    samples: a.samples, metrics: a.metrics, encoding: a.encoding, kind: a.base ? "delta" : "full", topk: null,
    shapes: {}, content_sha256: contentSha,
  });
}

/** Round a metric so its JSON text is the same in JS and pydantic (which re-serialises it to check the hash). */
export function metricValue(x: number): number {
  return Number.isInteger(x) ? x : Number(x.toPrecision(6));
}

export function encodeUpdate(a: UpdateArgs): Uint8Array {
  if (!ENCODINGS.includes(a.encoding)) throw new Error(`unknown encoding ${a.encoding}`);
  const out = new Map<string, Tensor>();
  const scales: number[] = [];
  for (const name of [...a.tensors.keys()].sort()) {
    const { shape, values } = a.tensors.get(name)!;
    let x = values;
    if (a.base) {
      const b = a.base.get(name);
      if (!b) throw new Error(`tensor ${name} has no base tensor to compute a delta against`);
      x = new Float32Array(values.length);
      for (let i = 0; i < x.length; i++) x[i] = values[i] - b[i];
    }
    for (const v of x) if (!Number.isFinite(v)) throw new Error(`tensor ${name} has NaN/Inf values; refusing to send it`);
    if (a.encoding === "fp32") {
      out.set(name, { dtype: "F32", shape, data: bytes(x.slice()) });
    } else if (a.encoding === "fp16") {
      const h = new Uint16Array(x.length);
      for (let i = 0; i < x.length; i++) h[i] = toF16Bits(x[i]);
      out.set(name, { dtype: "F16", shape, data: bytes(h) });
    } else {
      const rows = a.encoding === "int8-row" && shape.length >= 2 ? shape[0] : 1;
      const { q, scales: s } = quantize(x, rows);
      out.set(name, { dtype: "I8", shape, data: bytes(q) });
      scales.push(...s);
    }
  }
  if (scales.length) out.set("__scales__", { dtype: "F32", shape: [scales.length], data: bytes(new Float32Array(scales)) });
  const digest = contentHash(metaJson(a, ""), out);
  return writeSafetensors(out, { deftkit: metaJson(a, digest) });
}
