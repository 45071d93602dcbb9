#!/usr/bin/env bash
# Render a run's report.html in headless Chromium and save a screenshot, to check that the static page
# displays (no server, no network). Needs Debian's chromium: `sudo apt-get install chromium`.
#   scripts/render_report.sh runs/demo [out.png]
set -euo pipefail
run_dir=${1:?usage: render_report.sh RUN_DIR [OUT.png]}
out=${2:-$run_dir/report_screenshot.png}
html=$(realpath "$run_dir/report.html")
[ -f "$html" ] || { echo "no $run_dir/report.html: run 'pwself report $run_dir' first" >&2; exit 2; }
command -v chromium >/dev/null || { echo "chromium not found: sudo apt-get install chromium" >&2; exit 2; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --window-size=1200,2400 --screenshot="$(realpath -m "$out")" "file://$html" >/dev/null 2>&1
[ -s "$out" ] || { echo "chromium wrote no screenshot" >&2; exit 1; }
echo "screenshot: $out"
