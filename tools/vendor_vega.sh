#!/usr/bin/env bash
# Refresh the Vega, Vega-Lite and vega-embed builds the report inlines, with the licences of everything they bundle.
# Usage: tools/vendor_vega.sh [VEGA VEGA_LITE VEGA_EMBED]   (versions; npm must reach its registry)
# Then run tests/test_report.py: the browser test checks that the page draws every chart with these files.
set -euo pipefail
vega=${1:-6.4.0} vega_lite=${2:-6.4.3} vega_embed=${3:-7.3.0}
out=$(cd "$(dirname "$0")/../src/amplitude_export/report_assets" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
npm init -y >/dev/null
npm install --omit=dev --ignore-scripts --no-audit --no-fund "vega@$vega" "vega-lite@$vega_lite" "vega-embed@$vega_embed" >/dev/null
for file in vega/build/vega.min.js vega-lite/build/vega-lite.min.js vega-embed/build/vega-embed.min.js; do
  # without the source-map comment: a browser with developer tools open would ask for the missing .map file
  grep -v '^//# sourceMappingURL=' "node_modules/$file" > "$out/$(basename "$file")"
done
node - "$out" <<'JS'
const fs = require("fs"), path = require("path");
const out = process.argv[2];
const root = "node_modules";
const dirs = fs.readdirSync(root).flatMap((name) => name.startsWith("@")
  ? fs.readdirSync(path.join(root, name)).map((sub) => path.join(root, name, sub)) : [path.join(root, name)]);
const packages = dirs.filter((dir) => fs.existsSync(path.join(dir, "package.json")))
  .map((dir) => ({dir, meta: JSON.parse(fs.readFileSync(path.join(dir, "package.json"), "utf8"))}))
  .sort((a, b) => a.meta.name.localeCompare(b.meta.name));
const versions = Object.fromEntries(["vega", "vega-lite", "vega-embed"].map(
  (name) => [name, packages.find((p) => p.meta.name === name).meta.version]));
fs.writeFileSync(path.join(out, "versions.json"), JSON.stringify(versions, null, 2) + "\n");
let text = "Third-party software in vega.min.js, vega-lite.min.js and vega-embed.min.js: the npm packages\n" +
  `vega ${versions.vega}, vega-lite ${versions["vega-lite"]}, vega-embed ${versions["vega-embed"]} and the ` +
  "packages they depend on (a superset of what the\nbrowser builds bundle), each with its licence.\n";
for (const {dir, meta} of packages) {
  const files = fs.readdirSync(dir).filter((f) => /^(licen[cs]e|copying|notice)/i.test(f)).sort();
  text += `\n${"=".repeat(100)}\n${meta.name} ${meta.version} (${meta.license})\n${"=".repeat(100)}\n`;
  text += files.length ? files.map((f) => fs.readFileSync(path.join(dir, f), "utf8").trim()).join("\n\n") + "\n"
                       : `No licence file in the package; package.json says: ${meta.license}\n`;
}
fs.writeFileSync(path.join(out, "LICENSES.txt"), text);
JS
ls -l "$out"
