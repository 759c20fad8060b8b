/** Trains the bundle's step graph with onnxruntime-web: one ``session.run`` is one AdamW step (contract:
 * device_runtime/step_contract.py). The frozen weights are the graph's external data, handed to ONNX
 * Runtime as the bundle's weights.safetensors bytes (the graph points at each tensor's offset there). */
import * as ort from "onnxruntime-web/wasm";
import type { Bundle } from "./bundle.js";
import { type Batch, batchIndices, makeBatch } from "./data.js";

export const STEP_LR = "lr";
export const STEP_T = "step";
const ADAM_M = "adam_m/";
const ADAM_V = "adam_v/";
const NEW = "new/";

export interface HyperParams {
  steps?: number;
  epochs?: number;
  batch_size?: number;
  lr?: number;
  schedule?: "linear" | "constant" | "cosine";
  warmup_steps?: number;
  seed?: number;
}

/** device_runtime/train.py ``lr_at``. */
export function lrAt(step: number, total: number, hp: Required<Pick<HyperParams, "lr" | "schedule" | "warmup_steps">>): number {
  if (hp.warmup_steps && step < hp.warmup_steps) return (hp.lr * (step + 1)) / hp.warmup_steps;
  if (hp.schedule === "constant") return hp.lr;
  const span = Math.max(1, total - hp.warmup_steps);
  const frac = (step - hp.warmup_steps) / span;
  if (hp.schedule === "linear") return hp.lr * Math.max(0, 1 - frac);
  return hp.lr * 0.5 * (1 + Math.cos(Math.PI * frac));
}

export interface StepTrace {
  step: number;
  lr: number;
  loss: number;
  ms: number;
  batch: { input_ids: number[]; attention_mask: number[]; labels: number[]; shape: [number, number] };
}

export interface TrainResult {
  tensors: Map<string, { shape: number[]; values: Float32Array }>;
  start: Map<string, Float32Array>;
  losses: number[];
  stepMs: number[];
  samples: number;
  steps: number;
  trace: StepTrace[];
  accuracy: number | null;
}

function externalData(b: Bundle, graph: string): { path: string; data: Uint8Array }[] {
  // a copy: the tar's subarray would hand ONNX Runtime the whole download's buffer
  return b.manifest.step.external[graph]?.length ? [{ path: "weights.safetensors", data: b.files.get("weights.safetensors")!.slice() }] : [];
}

async function session(b: Bundle, graph: string): Promise<ort.InferenceSession> {
  return ort.InferenceSession.create(b.files.get(graph)!.slice(), {
    executionProviders: ["wasm"],
    externalData: externalData(b, graph),
    enableMemPattern: false,
  });
}

function batchFeeds(batch: Batch, names: readonly string[]): Record<string, ort.Tensor> {
  const dims = [batch.rows, batch.width];
  const all: Record<string, ort.Tensor> = {
    input_ids: new ort.Tensor("int64", batch.input_ids, dims),
    attention_mask: new ort.Tensor("int64", batch.attention_mask, dims),
    labels: new ort.Tensor("int64", batch.labels, [batch.rows]),
  };
  return Object.fromEntries(Object.entries(all).filter(([k]) => names.includes(k)));
}

export interface TrainArgs {
  bundle: Bundle;
  ids: number[][];
  labels: number[];
  hp: HyperParams;
  seed: number;
  /** the global tensors to start from (by manifest name); missing: the bundle's initial values */
  initial: Map<string, Float32Array> | null;
  onStep?: (done: number, total: number, loss: number) => void;
  /** rows scored with the eval graph after training (local accuracy); 0: skip */
  evalRows?: number;
  traceSteps?: number;
}

export async function train(a: TrainArgs): Promise<TrainResult> {
  const m = a.bundle.manifest;
  const names = m.trainable.map((t) => t.name);
  const shapes = new Map(m.trainable.map((t) => [t.name, t.shape]));
  const bs = a.hp.batch_size ?? 16;
  const spe = Math.ceil(a.ids.length / bs);
  const total = a.hp.steps ?? Math.max(1, Math.ceil((a.hp.epochs ?? 1) * spe));
  const sched = { lr: a.hp.lr ?? 1e-3, schedule: a.hp.schedule ?? "linear", warmup_steps: a.hp.warmup_steps ?? 0 };
  const sess = await session(a.bundle, m.step.train_graph);
  const state = new Map<string, Float32Array>();
  const start = a.initial ?? (await initialTensors(a.bundle, names));
  for (const n of names) {
    const init = start.get(n);
    if (!init) throw new Error(`the global state has no tensor ${n}: it was made for another bundle`);
    state.set(n, init.slice());
    state.set(ADAM_M + n, new Float32Array(init.length));
    state.set(ADAM_V + n, new Float32Array(init.length));
  }
  const shapeOf = (k: string) => shapes.get(k.replace(/^adam_[mv]\//, ""))!;
  const losses: number[] = [];
  const stepMs: number[] = [];
  const trace: StepTrace[] = [];
  let samples = 0;
  for (let step = 0; step < total; step++) {
    const idx = batchIndices(a.ids.length, bs, a.seed, step);
    const batch = makeBatch(a.ids, a.labels, idx, m);
    const lr = lrAt(step, total, sched);
    const feeds = batchFeeds(batch, sess.inputNames);
    feeds[STEP_LR] = new ort.Tensor("float32", new Float32Array([lr]), []);
    feeds[STEP_T] = new ort.Tensor("float32", new Float32Array([step + 1]), []);
    for (const [k, v] of state) feeds[k] = new ort.Tensor("float32", v, shapeOf(k));
    const t0 = performance.now();
    const out = await sess.run(feeds);
    const ms = performance.now() - t0;
    for (const k of state.keys()) state.set(k, out[NEW + k].data as Float32Array);
    const loss = (out.loss.data as Float32Array)[0];
    losses.push(loss);
    stepMs.push(ms);
    samples += idx.length;
    if (step < (a.traceSteps ?? 3)) {
      trace.push({ step, lr, loss, ms, batch: { input_ids: Array.from(batch.input_ids, Number),
        attention_mask: Array.from(batch.attention_mask, Number), labels: Array.from(batch.labels, Number),
        shape: [batch.rows, batch.width] } });
    }
    a.onStep?.(step + 1, total, loss);
  }
  await sess.release();
  const tensors = new Map(names.map((n) => [n, { shape: shapes.get(n)!, values: state.get(n)! }]));
  const accuracy = a.evalRows ? await localAccuracy(a, tensors, a.evalRows) : null;
  return { tensors, start, losses, stepMs, samples, steps: total, trace, accuracy };
}

/** The trainable tensors' values in weights.safetensors (the bundle's starting point). */
async function initialTensors(b: Bundle, names: string[]): Promise<Map<string, Float32Array>> {
  const { readSafetensors, asFloat32 } = await import("./safetensors.js");
  const { tensors } = readSafetensors(b.files.get("weights.safetensors")!);
  return new Map(names.map((n) => {
    const t = tensors.get(n);
    if (!t) throw new Error(`weights.safetensors lacks the trainable tensor ${n}`);
    return [n, asFloat32(t)];
  }));
}

/** Accuracy of the trained tensors on (up to ``limit`` of) the local rows, with the eval graph. */
async function localAccuracy(a: TrainArgs, tensors: TrainResult["tensors"], limit: number): Promise<number> {
  const sess = await session(a.bundle, a.bundle.manifest.step.eval_graph);
  const n = Math.min(limit, a.ids.length);
  let right = 0;
  for (let s = 0; s < n; s += 32) {
    const idx = [...Array(Math.min(32, n - s)).keys()].map((i) => s + i);
    const batch = makeBatch(a.ids, a.labels, idx, a.bundle.manifest);
    const feeds = batchFeeds(batch, sess.inputNames);
    for (const [k, t] of tensors) if (sess.inputNames.includes(k)) feeds[k] = new ort.Tensor("float32", t.values, t.shape);
    const out = await sess.run(feeds);
    const logits = out.logits.data as Float32Array;
    const c = logits.length / idx.length;
    idx.forEach((r, b) => {
      let best = 0;
      for (let j = 1; j < c; j++) if (logits[b * c + j] > logits[b * c + best]) best = j;
      if (best === a.labels[r]) right++;
    });
  }
  await sess.release();
  return right / n;
}
