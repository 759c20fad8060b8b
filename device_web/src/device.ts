/** The browser device: the same conversation as device_runtime/agent.py, over MQTT WebSockets.
 * connect (user = device id) -> retained status + hello -> tasks -> bundle (chunked, hashed, verified)
 * -> global state -> train (trainer.ts) -> update payload (payload.ts), chunked -> wait for the edge's ack. */
import { Buffer } from "buffer";
import mqtt, { type MqttClient } from "mqtt";
import { type Bundle, openBundle } from "./bundle.js";
import { Reassembler, payloadBudget, split } from "./chunking.js";
import { decode, type Envelope, encode, jsonMessage, build } from "./envelope.js";
import { fromUtf8, sha256Hex } from "./hash.js";
import { ENCODINGS, type Encoding, encodeUpdate, metricValue } from "./payload.js";
import { asFloat32, readSafetensors } from "./safetensors.js";
import { Topics } from "./topics.js";
import { tokenize, parseRows } from "./data.js";
import { type HyperParams, type TrainResult, train } from "./trainer.js";

export const KIT_VERSION = "web-0.1.0";

export interface Task {
  round: number;
  bundle_hash: string;
  global_round?: number | null;
  global_sha256?: string | null;
  hyperparams: HyperParams & Record<string, unknown>;
  encoding: Encoding;
  delta: boolean;
}

export interface DeviceConfig {
  broker: string;
  id: string;
  password: string;
  fleet: string;
  data: string;
  threads: number;
}

export interface Events {
  status(text: string): void;
  error(text: string): void;
  progress(done: number, total: number, loss: number): void;
  round(info: RoundInfo): void;
}

export interface RoundInfo {
  round: number;
  accepted: boolean | null;
  reason: string | null;
  losses: number[];
  stepMs: number[];
  accuracy: number | null;
  updateBytes: number;
  trace: TrainResult["trace"];
}

/** Why a connection was refused, in words (MQTT 5 reason codes; 4/5 are MQTT 3.1.1's). */
function refusal(code: number | undefined, id: string): string | null {
  // Mosquitto answers a wrong password and an unknown user alike (it does not tell which)
  if ([134, 135, 4, 5].includes(code ?? -1)) {
    return `wrong password for device '${id}' (or no such account): use the id and password the edge printed for it`;
  }
  return null;
}

export class WebDevice {
  private client: MqttClient | null = null;
  private topics: Topics;
  private reasm = new Reassembler();
  private bundles = new Map<string, Bundle>();
  private bundleWaiters = new Map<string, (tar: Uint8Array) => void>();
  private globals = new Map<number, Envelope>();
  private acks = new Map<string, (ok: { accepted: boolean; reason: string | null }) => void>();
  private tasks: Task[] = [];
  private busy = false;
  private maxPacket = 256 * 1024;
  private state: { state: string; round: number | null } = { state: "idle", round: null };
  private beat: ReturnType<typeof setInterval> | null = null;
  readonly done: RoundInfo[] = [];

  constructor(private cfg: DeviceConfig, private ev: Events) {
    this.topics = new Topics(cfg.fleet);
  }

  private env(type: string, obj: unknown, round?: number): Uint8Array {
    return encode(jsonMessage(type, obj, { sender: this.cfg.id, fleet: this.cfg.fleet, round }));
  }

  /** Connect and say hello; rejects with a clear message (wrong password, unreachable broker). */
  connect(): Promise<void> {
    const { id } = this.cfg;
    const t = this.topics;
    return new Promise((resolve, reject) => {
      const c = mqtt.connect(this.cfg.broker, {
        clientId: `deft-web-${id}`, username: id, password: this.cfg.password, protocolVersion: 5, clean: true,
        // no retry until the first connect answered (a wrong password must show, not loop); a long keepalive:
        // a phone throttles a background tab's timers, and training holds the main thread between steps
        reconnectPeriod: 0, connectTimeout: 10_000, keepalive: 60,
        will: { topic: t.status(id), payload: Buffer.from(this.env("status", { state: "offline" })), qos: 1, retain: true },
      });
      this.client = c;
      let opened = false;
      c.on("error", (err: Error & { code?: number }) => {
        const why = refusal(err.code, id) ??
          (opened ? `connection problem: ${err.message}` : `cannot connect to ${this.cfg.broker}: ${err.message}`);
        if (!opened) {
          c.end(true);
          reject(new Error(why));
        } else this.ev.error(why);
      });
      c.on("connect", async (connack) => {
        if (opened) { // a reconnect: mqtt.js resubscribes; say we are back
          c.publish(t.status(id), Buffer.from(this.env("status", { state: "online" })), { qos: 1, retain: true });
          this.ev.status("reconnected");
          return;
        }
        opened = true;
        c.options.reconnectPeriod = 2000;
        this.maxPacket = connack.properties?.maximumPacketSize ?? this.maxPacket;
        c.on("message", (topic, payload) => this.onMessage(topic, new Uint8Array(payload)));
        await c.subscribeAsync([t.taskFor(id), t.taskAll(), t.ackTo(id), `${t.base}/to/${id}/bundle/+`, t.bundleAll(),
          t.globalState()], { qos: 1 });
        await c.publishAsync(t.status(id), Buffer.from(this.env("status", { state: "online" })), { qos: 1, retain: true });
        const profile = { board: "browser", kind: "browser", cores: navigator.hardwareConcurrency ?? null,
          memory_gb: (navigator as { deviceMemory?: number }).deviceMemory ?? null, user_agent: navigator.userAgent,
          threads: this.cfg.threads };
        const hello = { kit_version: KIT_VERSION, profile, bundles: [...this.bundles.keys()],
          capabilities: { backend: "ort-web", encodings: [...ENCODINGS] } };
        await c.publishAsync(t.hello(id), Buffer.from(this.env("hello", hello)), { qos: 1, retain: true });
        this.beat = setInterval(() => {
          c.publish(t.heartbeat(id), Buffer.from(this.env("heartbeat", this.state)), { qos: 0 });
        }, 2000);
        this.ev.status(`connected to ${this.cfg.broker} as ${id}; waiting for a task`);
        resolve();
      });
      c.on("close", () => this.ev.status(opened ? "disconnected; reconnecting" : "disconnected"));
    });
  }

  close(): void {
    if (this.beat) clearInterval(this.beat);
    this.client?.end(true);
  }

  private onMessage(topic: string, payload: Uint8Array): void {
    const parts = topic.split("/");
    const kind = parts[3] === "all" ? parts[4] : parts[5];
    let env: Envelope;
    try {
      env = decode(payload);
    } catch (e) {
      const what = kind === "bundle" ? "a bundle chunk" : `a ${kind} message`;
      this.ev.error(`refused ${what}: ${(e as Error).message}`);
      return;
    }
    if (kind === "task") {
      this.tasks.push(JSON.parse(fromUtf8.decode(env.body)) as Task);
      void this.pump();
    } else if (kind === "ack") {
      const a = JSON.parse(fromUtf8.decode(env.body)) as { ack: string; accepted: boolean; reason: string | null };
      this.acks.get(a.ack)?.({ accepted: a.accepted, reason: a.reason });
    } else if (kind === "global") {
      this.globals.set(env.header.round ?? 0, env);
    } else if (kind === "bundle") {
      const token = parts[parts.length - 1];
      let whole: Envelope | null;
      try {
        whole = this.reasm.add(env);
      } catch (e) {
        this.ev.error(`refused the bundle: ${(e as Error).message}`);
        return;
      }
      const p = this.reasm.progress(token);
      if (p) this.ev.status(`downloading bundle ${token.slice(0, 12)}: chunk ${p[0]}/${p[1]}`);
      if (whole) this.bundleWaiters.get(token)?.(whole.body);
    }
  }

  private async pump(): Promise<void> {
    if (this.busy) return;
    this.busy = true;
    try {
      while (this.tasks.length) {
        const task = this.tasks.shift()!;
        if (this.done.some((d) => d.round >= task.round)) continue;
        try {
          await this.serve(task);
        } catch (e) {
          this.ev.error(`round ${task.round}: ${(e as Error).message}`);
          this.state = { state: "idle", round: null };
        }
      }
    } finally {
      this.busy = false;
    }
  }

  /** The bundle from the edge that served this page (/bundle/<hash>.tar), or null when it does not serve it.
   * Verified exactly like a chunked download: the hash it must have came in the task, over MQTT. */
  private async httpBundle(hash: string): Promise<Bundle | null> {
    let res: Response;
    try {
      res = await fetch(new URL(`bundle/${hash}.tar`, location.href));
    } catch {
      return null;
    }
    if (!res.ok) return null;
    this.ev.status(`downloading bundle ${hash.slice(0, 12)} from the edge`);
    const tar = new Uint8Array(await res.arrayBuffer());
    const b = openBundle(hash, tar);
    this.ev.status(`bundle ${hash.slice(0, 12)} verified (${Object.keys(b.manifest.files).length} files, ${tar.length} bytes, HTTP)`);
    return b;
  }

  private async fetchBundle(hash: string): Promise<Bundle> {
    const have = this.bundles.get(hash) ?? (await this.httpBundle(hash));
    if (have) {
      this.bundles.set(hash, have);
      return have;
    }
    const c = this.client!;
    const ask = (missing: number[] | null) =>
      c.publishAsync(this.topics.bundleRequest(this.cfg.id), Buffer.from(this.env("bundle-request", { bundle: hash, missing })), { qos: 1 });
    this.ev.status(`fetching bundle ${hash.slice(0, 12)}`);
    for (let attempt = 0; attempt < 5; attempt++) {
      const got = new Promise<Uint8Array | null>((resolve) => {
        let last = -1;
        const timer = setInterval(() => { // a stalled download (lost or refused chunks): ask again
          const p = this.reasm.progress(hash)?.[0] ?? 0;
          if (p === last) {
            clearInterval(timer);
            resolve(null);
          }
          last = p;
        }, 20_000);
        this.bundleWaiters.set(hash, (tar) => {
          clearInterval(timer);
          resolve(tar);
        });
      });
      await ask(this.reasm.missing(hash));
      const tar = await got;
      if (tar) {
        const b = openBundle(hash, tar);
        this.bundles.set(hash, b);
        this.ev.status(`bundle ${hash.slice(0, 12)} verified (${Object.keys(b.manifest.files).length} files, ${tar.length} bytes, MQTT)`);
        return b;
      }
    }
    throw new Error(`bundle ${hash.slice(0, 12)} download stalled; is the coordinator running?`);
  }

  private async waitGlobal(task: Task): Promise<Map<string, Float32Array> | null> {
    if (task.global_round === null || task.global_round === undefined) return null;
    const until = Date.now() + 120_000;
    while (Date.now() < until) {
      const g = this.globals.get(task.global_round);
      if (g && (!task.global_sha256 || g.header.sha256 === task.global_sha256)) {
        const { tensors } = readSafetensors(g.body);
        return new Map([...tensors].map(([k, t]) => [k, asFloat32(t)]));
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`global state of round ${task.global_round} never arrived`);
  }

  private async serve(task: Task): Promise<void> {
    const { id, fleet } = this.cfg;
    this.state = { state: "downloading", round: task.round };
    const bundle = await this.fetchBundle(task.bundle_hash);
    const base = await this.waitGlobal(task);
    if (base) {
      const mine = new Set(bundle.manifest.trainable.map((t) => t.name));
      const other = [...base.keys()].filter((k) => !mine.has(k));
      if (other.length) throw new Error(`block-subset tasks (${other.length} frozen global tensors) are not supported in the browser`);
    }
    const rows = parseRows(this.cfg.data, bundle.manifest.labels);
    const tokJson = JSON.parse(fromUtf8.decode(bundle.files.get("tokenizer.json")!));
    const ids = tokenize(rows.texts, tokJson, bundle.manifest.max_length);
    this.state = { state: "training", round: task.round };
    this.ev.status(`round ${task.round}: training on ${ids.length} rows`);
    const hp = task.hyperparams;
    const res = await train({ bundle, ids, labels: rows.labels, hp, seed: (hp.seed ?? 0) + task.round * 1009,
      initial: base, onStep: (d, n, l) => this.ev.progress(d, n, l), evalRows: 256, traceSteps: 32 });
    const median = [...res.stepMs].sort((a, b) => a - b)[Math.floor(res.stepMs.length / 2)] / 1000;
    const metrics: Record<string, number> = { train_rows: ids.length, steps: res.steps, median_step_s: metricValue(median),
      final_train_loss: metricValue(res.losses[res.losses.length - 1]) };
    if (res.accuracy !== null) metrics.local_accuracy = metricValue(res.accuracy);
    const blob = encodeUpdate({ bundleHash: bundle.hash, deviceId: id, round: task.round, samples: res.samples, metrics,
      encoding: task.encoding, tensors: res.tensors, base: task.delta ? res.start : undefined });
    const env = build("update", { sender: id, fleet, round: task.round, body: blob, content: "safetensors",
      key: `${id}-r${task.round}-${sha256Hex(blob).slice(0, 8)}` });
    this.state = { state: "uploading", round: task.round };
    const ack = await this.upload(env, task.round);
    this.state = { state: "idle", round: null };
    const info: RoundInfo = { round: task.round, accepted: ack?.accepted ?? null, reason: ack ? ack.reason : "no acknowledgement",
      losses: res.losses, stepMs: res.stepMs, accuracy: res.accuracy, updateBytes: blob.length, trace: res.trace };
    this.done.push(info);
    this.ev.round(info);
  }

  private async upload(env: Envelope, round: number): Promise<{ accepted: boolean; reason: string | null } | null> {
    const topic = this.topics.update(this.cfg.id, round);
    const chunks = split(env, payloadBudget(this.maxPacket, topic));
    for (let attempt = 1; attempt <= 5; attempt++) {
      const acked = new Promise<{ accepted: boolean; reason: string | null } | null>((resolve) => {
        const timer = setTimeout(() => resolve(null), 15_000);
        this.acks.set(env.header.key, (a) => {
          clearTimeout(timer);
          resolve(a);
        });
      });
      this.ev.status(`round ${round}: uploading the update (${env.body.length} bytes, ${chunks.length} message(s))`);
      for (const ch of chunks) await this.client!.publishAsync(topic, Buffer.from(encode(ch)), { qos: 1 });
      const a = await acked;
      if (a) return a;
      this.ev.status(`round ${round}: no acknowledgement; resending (attempt ${attempt + 1})`);
    }
    return null;
  }
}
