/** A received bundle: the edge's deterministic tar (device_runtime/bundle/archive.py), unpacked in memory
 * and verified like the Python device does: every file's sha256 against the manifest, and the bundle
 * hash (sha256 over the sorted "name:sha256\n" lines) against the one the task names. */
import { fromUtf8, sha256Hex, utf8 } from "./hash.js";

export class BundleError extends Error {}

export interface Manifest {
  schema_version: number;
  format: string;
  task: string;
  labels: string[];
  max_length: number;
  inputs: string[];
  pad_token_id: number;
  dropout: boolean;
  trainable: { name: string; shape: number[] }[];
  step: { train_graph: string; eval_graph: string; external: Record<string, string[]> };
  files: Record<string, string>;
}

export interface Bundle {
  hash: string;
  manifest: Manifest;
  files: Map<string, Uint8Array>;
}

function octal(b: Uint8Array): number {
  const s = fromUtf8.decode(b).replace(/\0.*$/s, "").trim();
  return s ? parseInt(s, 8) : 0;
}

/** Regular files of a ustar/pax tar (pax headers give long names and sizes). */
export function untar(tar: Uint8Array): Map<string, Uint8Array> {
  const out = new Map<string, Uint8Array>();
  let off = 0;
  let paxName: string | null = null;
  let paxSize: number | null = null;
  while (off + 512 <= tar.length) {
    const h = tar.subarray(off, off + 512);
    if (h.every((x) => x === 0)) break;
    let name = fromUtf8.decode(h.subarray(0, 100)).replace(/\0.*$/s, "");
    const prefix = fromUtf8.decode(h.subarray(345, 500)).replace(/\0.*$/s, "");
    if (prefix) name = `${prefix}/${name}`;
    let size = octal(h.subarray(124, 136));
    const type = String.fromCharCode(h[156] || 48);
    const body = off + 512;
    if (type === "x") {
      const text = fromUtf8.decode(tar.subarray(body, body + size));
      for (const line of text.split("\n")) {
        const m = /^\d+ ([^=]+)=(.*)$/s.exec(line);
        if (m?.[1] === "path") paxName = m[2];
        if (m?.[1] === "size") paxSize = Number(m[2]);
      }
    } else if (type === "0") {
      if (paxSize !== null) size = paxSize;
      out.set(paxName ?? name, tar.subarray(body, body + size));
      paxName = paxSize = null;
    }
    off = body + Math.ceil(size / 512) * 512;
  }
  return out;
}

export function bundleHash(files: Record<string, string>): string {
  const lines = Object.keys(files).sort().map((k) => `${k}:${files[k]}\n`).join("");
  return sha256Hex(utf8.encode(lines));
}

export function openBundle(expectedHash: string, tar: Uint8Array): Bundle {
  const files = untar(tar);
  const raw = files.get("manifest.json");
  if (!raw) throw new BundleError("the received bundle has no manifest.json");
  const manifest = JSON.parse(fromUtf8.decode(raw)) as Manifest;
  if (manifest.format !== "step") {
    throw new BundleError(`bundle format '${manifest.format}' cannot train in a browser: export it with --format step`);
  }
  for (const [name, sha] of Object.entries(manifest.files)) {
    const f = files.get(name);
    if (!f) throw new BundleError(`bundle file ${name} is missing`);
    if (sha256Hex(f) !== sha) throw new BundleError(`bundle file ${name} fails its sha256 check: refused`);
  }
  const h = bundleHash(manifest.files);
  if (h !== expectedHash) throw new BundleError(`received bundle is ${h.slice(0, 12)}, the task asked for ${expectedHash.slice(0, 12)}`);
  return { hash: h, manifest, files };
}
