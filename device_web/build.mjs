// Builds dist/: index.html, app.js (esbuild bundle of src/main.ts) and onnxruntime-web's WASM files.
import { build } from "esbuild";
import { copyFileSync, mkdirSync, rmSync } from "node:fs";

rmSync("dist", { recursive: true, force: true });
mkdirSync("dist/ort", { recursive: true });
await build({
  entryPoints: ["src/main.ts"], bundle: true, format: "esm", platform: "browser", target: "es2022",
  outfile: "dist/app.js", minify: true, sourcemap: true, logLevel: "warning",
});
await build({ // the wire-format modules alone, for the Node golden test (test/golden.mjs)
  entryPoints: ["src/node_protocol.ts"], bundle: true, format: "esm", platform: "node", target: "node20",
  outfile: "dist/node/protocol.mjs", logLevel: "warning",
});
copyFileSync("index.html", "dist/index.html");
for (const f of ["ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.mjs"]) {
  copyFileSync(`node_modules/onnxruntime-web/dist/${f}`, `dist/ort/${f}`);
}
