/** The page: a form (broker, device id, password, local data), then the device runs and the page shows
 * its status, training progress, losses, step time and accuracy. ``window.deft`` mirrors that state
 * for tests and curious users. */
import * as ort from "onnxruntime-web/wasm";
import { type RoundInfo, WebDevice } from "./device.js";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

interface PageState {
  status: string;
  error: string | null;
  connected: boolean;
  threads: number;
  isolated: boolean;
  rounds: RoundInfo[];
  progress: { done: number; total: number; loss: number } | null;
}

const state: PageState = { status: "not connected", error: null, connected: false, threads: 1,
  isolated: globalThis.crossOriginIsolated === true, rounds: [], progress: null };
(window as unknown as { deft: PageState }).deft = state;

function show(): void {
  $("status").textContent = state.status;
  const err = $("error");
  err.textContent = state.error ?? "";
  err.hidden = !state.error;
  const p = state.progress;
  $<HTMLProgressElement>("bar").value = p ? p.done / p.total : 0;
  $("step").textContent = p ? `step ${p.done}/${p.total}, loss ${p.loss.toFixed(4)}` : "";
  $("rounds").innerHTML = state.rounds.map((r) => {
    const med = [...r.stepMs].sort((a, b) => a - b)[Math.floor(r.stepMs.length / 2)];
    const verdict = r.accepted ? "accepted" : r.accepted === false ? `rejected: ${r.reason}` : "no acknowledgement";
    return `<tr><td>${r.round}</td><td>${r.losses.length}</td><td>${r.losses[r.losses.length - 1].toFixed(4)}</td>` +
      `<td>${med.toFixed(0)} ms</td><td>${r.accuracy === null ? "-" : `${(100 * r.accuracy).toFixed(1)}%`}</td>` +
      `<td>${(r.updateBytes / 1024).toFixed(1)} KiB</td><td class="${r.accepted ? "ok" : "bad"}">${verdict}</td></tr>`;
  }).join("");
}

function defaults(): void {
  const q = new URLSearchParams(location.search);
  const host = location.hostname || "127.0.0.1";
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  $<HTMLInputElement>("broker").value = q.get("broker") ?? `${scheme}://${host}:${q.get("wsport") ?? "9001"}`;
  $<HTMLInputElement>("fleet").value = q.get("fleet") ?? "default";
  $<HTMLInputElement>("id").value = q.get("id") ?? "";
  const cores = navigator.hardwareConcurrency || 1;
  state.threads = state.isolated ? Math.min(Number(q.get("threads") ?? 2), cores) : 1;
  $("env").textContent = `${cores} cores; WASM threads: ${state.threads}` +
    (state.isolated ? "" : " (page not cross-origin isolated: single-threaded)");
}

async function readData(): Promise<string> {
  const file = $<HTMLInputElement>("file").files?.[0];
  return file ? file.text() : $<HTMLTextAreaElement>("rows").value;
}

async function start(ev: Event): Promise<void> {
  ev.preventDefault();
  state.error = null;
  const btn = $<HTMLButtonElement>("join");
  btn.disabled = true;
  ort.env.wasm.numThreads = state.threads;
  ort.env.wasm.wasmPaths = new URL("./ort/", location.href).href;
  const dev = new WebDevice({
    broker: $<HTMLInputElement>("broker").value.trim(), id: $<HTMLInputElement>("id").value.trim(),
    password: $<HTMLInputElement>("password").value, fleet: $<HTMLInputElement>("fleet").value.trim(),
    data: await readData(), threads: state.threads,
  }, {
    status: (t) => { state.status = t; console.info(t); show(); },
    error: (t) => { state.error = t; console.warn(t); show(); },
    progress: (done, total, loss) => { state.progress = { done, total, loss }; show(); },
    round: (info) => {
      state.rounds.push(info);
      state.status = `round ${info.round} done: update ${info.accepted ? "accepted" : "not accepted"}; waiting for the next task`;
      show();
    },
  });
  try {
    await dev.connect();
    state.connected = true;
  } catch (e) {
    state.error = (e as Error).message;
    state.status = "not connected";
    btn.disabled = false;
  }
  show();
}

defaults();
$("form").addEventListener("submit", (e) => void start(e));
show();
