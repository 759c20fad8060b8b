/** sha256 as lowercase hex. @noble/hashes, not WebCrypto: a phone page served over plain http on the
 * LAN is not a "secure context", and browsers hide crypto.subtle there. */
import { sha256 } from "@noble/hashes/sha2.js";

export function sha256Hex(...parts: Uint8Array[]): string {
  const h = sha256.create();
  for (const p of parts) h.update(p);
  return toHex(h.digest());
}

export function sha256Stream(): { update(p: Uint8Array): void; hex(): string } {
  const h = sha256.create();
  return { update: (p) => void h.update(p), hex: () => toHex(h.digest()) };
}

function toHex(b: Uint8Array): string {
  let s = "";
  for (const x of b) s += x.toString(16).padStart(2, "0");
  return s;
}

export const utf8 = new TextEncoder();
export const fromUtf8 = new TextDecoder();
