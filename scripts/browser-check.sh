#!/usr/bin/env bash
# Checks the web page (src/serve/page.html, served at / by `bella-vqa serve`) in a real browser:
# Debian's chromium driven headlessly by playwright-core (pinned in scripts/browser/package-lock.json;
# playwright's own browser downloads are never used). Starts the server on the embedded demo, asks about
# an in-distribution image (the answer must be shown) and a photograph (the "not sure" state must be
# shown), and saves screenshots.
#
#   scripts/browser-check.sh [SCREENSHOT_DIR]      (default /tmp/bella-browser)
#
# The binary: $BELLA_VQA_BIN when set, else `cargo build --release` into $CARGO_TARGET_DIR (or ./target).
# On success the answered and the abstained screenshots are copied to eval/screenshots/ (as 256-colour
# PNGs, scripts/browser/png8.mjs).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
SHOTS="${1:-/tmp/bella-browser}"
CHROMIUM=/usr/bin/chromium

say() { echo "browser-check: $*" >&2; }
die() { say "$*"; exit 1; }

# --- the browser ---------------------------------------------------------------------------------
if [ ! -x "$CHROMIUM" ]; then
  say "installing Debian's chromium (apt-get)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  [ -x "$CHROMIUM" ] || die "apt-get installed no $CHROMIUM"
fi
say "$("$CHROMIUM" --version 2>/dev/null | tail -n 1)"

# --- the driver: node + playwright-core ------------------------------------------------------------
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 \
  || die "node and npm are needed (node >= 20); install them and rerun"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' \
  || die "node $(node --version) is too old: playwright-core needs node >= 20"
(
  cd scripts/browser
  wanted="$(node -p 'require("./package.json").dependencies["playwright-core"]')"
  have="$(node -p 'require("./node_modules/playwright-core/package.json").version' 2>/dev/null || true)"
  if [ "$have" != "$wanted" ]; then
    say "installing playwright-core $wanted (npm ci, no browser download)"
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >/dev/null
  fi
)

# --- the server binary -----------------------------------------------------------------------------
if [ -n "${BELLA_VQA_BIN:-}" ]; then
  BIN="$BELLA_VQA_BIN"
else
  TARGET="${CARGO_TARGET_DIR:-$REPO/target}"
  say "building the release binary (cargo build --release --locked, target $TARGET)"
  cargo build --release --locked --quiet
  BIN="$TARGET/release/bella-vqa"
fi
[ -x "$BIN" ] || die "no executable server binary at $BIN"

# --- start the server on the demo, stop it on any exit ---------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/bella-browser-check.XXXXXX")"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# (BELLA_API_KEY would make the server require a key the page does not have)
env -u BELLA_API_KEY "$BIN" serve --port 0 >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
BASE=""
for _ in $(seq 1 600); do   # the first start unpacks the demo model: allow up to a minute
  BASE="$(sed -n 's/.*listening on \(http:\/\/[^ ]*\).*/\1/p' "$WORK/server.log" | head -n 1)"
  [ -n "$BASE" ] && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; die "the server exited before listening"; }
  sleep 0.1
done
[ -n "$BASE" ] || { cat "$WORK/server.log" >&2; die "the server printed no 'listening on' line within 60 s"; }
say "server at $BASE (pid $SERVER_PID)"

# wait for /health (ready only once the model is loaded)
node -e '
  const url = process.argv[1] + "/health";
  const end = Date.now() + 120000;
  (async () => {
    for (;;) {
      try { const r = await fetch(url); if (r.ok) { console.error("browser-check: /health " + JSON.stringify(await r.json())); return; } } catch (e) {}
      if (Date.now() > end) { console.error("browser-check: " + url + " not ready after 120 s"); process.exit(1); }
      await new Promise((r) => setTimeout(r, 200));
    }
  })();' "$BASE"

# --- drive the page --------------------------------------------------------------------------------
mkdir -p "$SHOTS"
status=0
CHROMIUM="$CHROMIUM" node scripts/browser/check.mjs "$BASE" "$REPO" "$SHOTS" || status=$?
if [ "$status" -ne 0 ]; then
  say "FAILED (screenshots in $SHOTS; server log below)"
  tail -n 30 "$WORK/server.log" >&2
  exit "$status"
fi
mkdir -p eval/screenshots
# 256-colour copies: the same look at a third of the size
node scripts/browser/png8.mjs "$SHOTS/answer.png" eval/screenshots/page-answer.png
node scripts/browser/png8.mjs "$SHOTS/not-sure.png" eval/screenshots/page-not-sure.png
say "screenshots in $SHOTS; copied (256 colours) to eval/screenshots/page-answer.png and page-not-sure.png"
