/** Local data: labelled rows from a TSV/CSV file or a text box, tokenized with the bundle's tokenizer.json
 * (@huggingface/tokenizers, which reads it like Python's ``tokenizers``), truncated like
 * device_runtime/data.py (keeping a trailing [SEP]) and batched padded to the longest row. */
import { Tokenizer } from "@huggingface/tokenizers";
import type { Manifest } from "./bundle.js";

export interface Rows {
  ids: number[][];
  labels: number[];
  skipped: number;
}

const TEXT = ["sentence", "text", "review", "content"];
const LABEL = ["label", "labels", "target", "class"];

export class DataError extends Error {}

function splitLine(line: string, sep: string): string[] {
  return line.split(sep).map((c) => c.trim());
}

export function parseRows(text: string, labelNames: string[]): { texts: string[]; labels: number[]; skipped: number } {
  const lines = text.split(/\r?\n/).filter((l) => l.trim());
  if (!lines.length) throw new DataError("no rows: pick a file or type rows like 'a fine film<TAB>1'");
  const sep = lines[0].includes("\t") ? "\t" : ",";
  const head = splitLine(lines[0], sep).map((c) => c.toLowerCase());
  let ti = head.findIndex((c) => TEXT.includes(c));
  let li = head.findIndex((c) => LABEL.includes(c));
  let body = lines.slice(1);
  if (ti < 0 || li < 0) { // no header: "text<sep>label"
    ti = 0;
    li = 1;
    body = lines;
  }
  const texts: string[] = [];
  const labels: number[] = [];
  let skipped = 0;
  for (const line of body) {
    const cols = splitLine(line, sep);
    const t = cols[ti];
    const raw = cols[li];
    let lab = raw !== undefined && /^\d+$/.test(raw) ? Number(raw) : labelNames.indexOf(raw ?? "");
    if (lab >= labelNames.length) lab = -1;
    if (!t || lab < 0) {
      skipped++;
      continue;
    }
    texts.push(t);
    labels.push(lab);
  }
  if (!texts.length) {
    throw new DataError(`no usable rows (${skipped} skipped): each row needs a text and a label in ${labelNames.join("/")} or 0..${labelNames.length - 1}`);
  }
  return { texts, labels, skipped };
}

export function tokenize(texts: string[], tokenizerJson: object, maxLength: number): number[][] {
  const tok = new Tokenizer(tokenizerJson as never, {} as never);
  return texts.map((t) => {
    const ids = tok.encode(t).ids as number[];
    // device_runtime/data.py _truncate: keep the trailing special token ([SEP]) when cutting
    return ids.length <= maxLength ? ids : [...ids.slice(0, maxLength - 1), ids[ids.length - 1]];
  });
}

export interface Batch {
  input_ids: BigInt64Array;
  attention_mask: BigInt64Array;
  labels: BigInt64Array;
  rows: number;
  width: number;
}

export function makeBatch(ids: number[][], labels: number[], idx: number[], m: Manifest): Batch {
  const width = Math.max(...idx.map((i) => ids[i].length));
  const input = new BigInt64Array(idx.length * width).fill(BigInt(m.pad_token_id));
  const mask = new BigInt64Array(idx.length * width);
  idx.forEach((r, b) => {
    ids[r].forEach((t, j) => {
      input[b * width + j] = BigInt(t);
      mask[b * width + j] = 1n;
    });
  });
  return { input_ids: input, attention_mask: mask, labels: BigInt64Array.from(idx.map((i) => BigInt(labels[i]))), rows: idx.length, width };
}

/** mulberry32: a small seeded PRNG, so a device's batch order is reproducible. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Rows of 0-based ``step``: a fresh permutation per epoch; the last batch of an epoch may be smaller. */
export function batchIndices(n: number, batchSize: number, seed: number, step: number): number[] {
  const spe = Math.ceil(n / batchSize);
  const epoch = Math.floor(step / spe);
  const pos = step % spe;
  const order = [...Array(n).keys()];
  const r = rng(seed * 7919 + epoch);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(r() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  return order.slice(pos * batchSize, (pos + 1) * batchSize);
}
