/** The deft topic tree (device_runtime/protocol/topics.py is the source; checked against it by the tests). */
export const ROOT = "deft";
export const VERSION_SEGMENT = "v1";
const ID = /^[A-Za-z0-9_.-]{1,64}$/;

export function checkId(v: string, what = "device id"): string {
  if (!ID.test(v)) throw new Error(`invalid ${what} '${v}': use 1-64 characters from A-Z a-z 0-9 _ . -`);
  return v;
}

export class Topics {
  readonly base: string;
  constructor(readonly fleet: string) {
    this.base = `${ROOT}/${VERSION_SEGMENT}/${checkId(fleet, "fleet name")}`;
  }
  private dev(device: string, kind: string): string {
    return `${this.base}/device/${checkId(device)}/${kind}`;
  }
  hello(d: string): string { return this.dev(d, "hello"); }
  heartbeat(d: string): string { return this.dev(d, "heartbeat"); }
  status(d: string): string { return this.dev(d, "status"); }
  update(d: string, round: number): string { return `${this.dev(d, "update")}/${round}`; }
  bundleRequest(d: string): string { return this.dev(d, "bundle-request"); }
  taskFor(d: string): string { return `${this.base}/to/${checkId(d)}/task/+`; }
  ackTo(d: string): string { return `${this.base}/to/${checkId(d)}/ack`; }
  bundleTo(d: string, bundle: string): string { return `${this.base}/to/${checkId(d)}/bundle/${bundle}`; }
  taskAll(): string { return `${this.base}/all/task/+`; }
  globalState(): string { return `${this.base}/all/global`; }
  bundleAll(): string { return `${this.base}/all/bundle/+`; }
}
