// Drives the bella-vqa web page in Debian's chromium through playwright-core (no bundled browser).
// Usage: node check.mjs BASE_URL REPO_ROOT SCREENSHOT_DIR   (run by scripts/browser-check.sh)
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [base, repo, shots] = process.argv.slice(2);
if (!base || !repo || !shots) {
  console.error("usage: node check.mjs BASE_URL REPO_ROOT SCREENSHOT_DIR");
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
mkdirSync(shots, { recursive: true });

let passed = 0;
let failed = 0;
function check(name, ok, detail) {
  if (ok) { passed++; console.log(`  ok    ${name}`); }
  else { failed++; console.log(`  FAIL  ${name}${detail ? ": " + detail : ""}`); }
}

const profile = mkdtempSync(join(tmpdir(), "bella-browser-profile-"));
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    viewport: { width: 1280, height: 800 },
    timeout: 60_000,
  });
  const page = context.pages()[0] || await context.newPage();
  const consoleErrors = [];
  // (the browser logs every 4xx response as an error; the one provoked below is expected)
  page.on("console", (m) => { if (m.type() === "error" && !/Failed to load resource: the server responded with a status of 400/.test(m.text())) consoleErrors.push(m.text()); });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  // Only the server itself may be contacted: the page must work offline.
  const foreign = [];
  await page.route("**/*", (route) => {
    const url = route.request().url();
    if (url.startsWith(base) || url.startsWith("data:") || url.startsWith("blob:")) return route.continue();
    foreign.push(url);
    return route.abort();
  });

  await page.goto(base + "/", { waitUntil: "load" });
  check("page title", /bella-vqa/.test(await page.title()), await page.title());
  await page.waitForFunction(() => /Server ready/.test(document.getElementById("server-info").textContent), null, { timeout: 20_000 })
    .then(() => check("page reads /health", true), (e) => check("page reads /health", false, e.message));

  async function ask(image, question, shotName) {
    await page.setInputFiles("#image-input", typeof image === "string" ? join(repo, image) : image);
    if (typeof image === "string") {
      await page.waitForFunction(() => { const p = document.getElementById("preview"); return !p.hidden && p.complete && p.naturalWidth > 0; });
    } else {
      await page.waitForFunction(() => /Image ready/.test(document.getElementById("status").textContent));
    }
    await page.fill("#question", question);
    await page.click("#ask");
    await page.waitForFunction(() => ["done", "error"].includes(document.getElementById("status").dataset.state), null, { timeout: 120_000 });
    await page.screenshot({ path: join(shots, shotName), fullPage: true });
    return page.evaluate(() => ({
      status: document.getElementById("status").textContent,
      state: document.getElementById("status").dataset.state,
      error: document.getElementById("error").hidden ? "" : document.getElementById("error").textContent,
      answerVisible: !document.getElementById("answered-banner").hidden && document.getElementById("answered-banner").offsetParent !== null,
      answer: document.getElementById("answer").textContent.trim(),
      bannerVisible: !document.getElementById("abstained-banner").hidden && document.getElementById("abstained-banner").offsetParent !== null,
      bannerText: document.getElementById("abstained-banner").innerText,
      mostLikely: document.getElementById("most-likely").textContent.trim(),
      confidence: document.getElementById("confidence").textContent.trim(),
      threshold: document.getElementById("threshold").textContent.trim(),
      markerLeft: document.getElementById("threshold-marker").style.left,
      aleatoric: document.getElementById("aleatoric").textContent.trim(),
      epistemic: document.getElementById("epistemic").textContent.trim(),
      particles: [...document.querySelectorAll("#particles li")].map((li) => li.textContent.trim()),
      stale: document.getElementById("result").classList.contains("stale"),
    }));
  }

  console.log("in distribution: eval/demo/red-circle.png");
  const a = await ask("eval/demo/red-circle.png", "What color is the circle?", "answer.png");
  console.log("  page shows:", JSON.stringify(a));
  check("answered without error", a.state === "done" && !a.error, a.error || a.status);
  check("answer 'red' is shown", a.answerVisible && a.answer === "red", `visible=${a.answerVisible} answer=${JSON.stringify(a.answer)}`);
  check("not-sure banner hidden", !a.bannerVisible);
  check("confidence shown as a percentage", /^\d+(\.\d)?\s%/.test(a.confidence), a.confidence);
  check("threshold marker placed", /%$/.test(a.markerLeft) && a.threshold !== "", `${a.markerLeft} ${a.threshold}`);
  check("aleatoric and epistemic numbers shown", /^-?\d+\.\d+$/.test(a.aleatoric) && /^-?\d+\.\d+$/.test(a.epistemic), `${a.aleatoric} ${a.epistemic}`);
  check("every particle's answer listed", a.particles.length >= 1 && a.particles.every((t) => t.length > 2), String(a.particles.length));

  // A new image makes the shown answer the previous image's: dimmed at once, not at the next ask.
  await page.setInputFiles("#image-input", join(repo, "eval/demo/photo-cat.png"));
  await page.waitForFunction(() => /Image ready/.test(document.getElementById("status").textContent));
  check("a new image dims the previous answer", await page.evaluate(() => document.getElementById("result").classList.contains("stale")));

  // An image changed while a question is answered: the reply is said to be the previous image's.
  await page.setInputFiles("#image-input", join(repo, "eval/demo/red-circle.png"));
  await page.waitForFunction(() => /Image ready/.test(document.getElementById("status").textContent));
  const slow = async (route) => { await new Promise((r) => setTimeout(r, 1500)); return route.continue(); };
  await page.route("**/v1/chat/completions", slow);
  await page.fill("#question", "What color is the circle?");
  await page.click("#ask");
  await page.setInputFiles("#image-input", join(repo, "eval/demo/photo-cat.png"));
  await page.waitForFunction(() => /previous image/.test(document.getElementById("status").textContent));
  const busy = await page.evaluate(() => document.getElementById("status").dataset.state);
  check("the status stays busy while the old question is answered", busy === "busy", busy);
  await page.waitForFunction(() => document.getElementById("status").dataset.state === "done", null, { timeout: 120_000 });
  const late = await page.evaluate(() => ({
    status: document.getElementById("status").textContent,
    stale: document.getElementById("result").classList.contains("stale"),
  }));
  check("a late answer is said to be about the previous image", /about the previous image/.test(late.status) && late.stale, JSON.stringify(late));
  await page.unroute("**/v1/chat/completions", slow);

  // Cancel: a slow answer can be given up; the page is ready for the next question at once.
  const slower = async (route) => { await new Promise((r) => setTimeout(r, 3000)); return route.continue().catch(() => {}); };
  await page.route("**/v1/chat/completions", slower);
  await page.click("#ask");
  await page.waitForFunction(() => !document.getElementById("cancel").hidden);
  await page.click("#cancel");
  await page.waitForFunction(() => document.getElementById("status").dataset.state !== "busy", null, { timeout: 10_000 });
  const cancelled = await page.evaluate(() => ({
    state: document.getElementById("status").dataset.state,
    status: document.getElementById("status").textContent,
    error: document.getElementById("error").hidden ? "" : document.getElementById("error").textContent,
    askEnabled: !document.getElementById("ask").disabled,
    cancelHidden: document.getElementById("cancel").hidden,
    focus: document.activeElement && document.activeElement.id,
  }));
  check("Cancel gives up a slow answer without an error", cancelled.state === "idle" && /Cancelled/.test(cancelled.status) && !cancelled.error
    && cancelled.askEnabled && cancelled.cancelHidden && cancelled.focus === "ask", JSON.stringify(cancelled));
  await page.unroute("**/v1/chat/completions", slower);

  console.log("photograph: eval/demo/photo-cat.png");
  const b = await ask("eval/demo/photo-cat.png", "What color is the circle?", "not-sure.png");
  console.log("  page shows:", JSON.stringify(b));
  check("answered without error", b.state === "done" && !b.error, b.error || b.status);
  check("not-sure banner shown", b.bannerVisible && /Not sure/.test(b.bannerText), b.bannerText);
  check("the reason is the unfamiliar image", /unlike the ones the model was calibrated on/.test(b.bannerText), b.bannerText);
  check("most likely answer shown", b.mostLikely.length > 0, b.mostLikely);
  check("answered banner hidden", !b.answerVisible);

  // Narrow window: the same result must still fit without horizontal scrolling.
  await page.setViewportSize({ width: 400, height: 800 });
  await page.screenshot({ path: join(shots, "not-sure-narrow.png"), fullPage: true });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check("no horizontal scrolling at 400 px", overflow <= 0, `${overflow} px too wide`);
  await page.setViewportSize({ width: 1280, height: 800 });

  // A server error is shown readably: a file that claims to be a PNG but is not one (the server answers 400).
  const broken = { name: "broken.png", mimeType: "image/png", buffer: Buffer.from("this is not a PNG image") };
  const c = await ask(broken, "What color is the circle?", "error.png");
  console.log("  broken image:", JSON.stringify({ state: c.state, error: c.error }));
  check("server error shown readably", c.state === "error" && /The server answered 4\d\d/.test(c.error) && c.error.length > 30, c.error);
  check("the previous answer is dimmed after the error", c.stale);

  await page.fill("#question", "");
  await page.click("#ask");
  const emptyMsg = await page.evaluate(() => document.getElementById("error").hidden ? "" : document.getElementById("error").textContent);
  check("empty question is refused in the page", /question/i.test(emptyMsg), emptyMsg);

  check("no request left the server's origin", foreign.length === 0, foreign.join(", "));
  check("no console errors", consoleErrors.length === 0, consoleErrors.join(" | "));
} catch (e) {
  failed++;
  console.log(`  FAIL  ${e.stack || e}`);
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
console.log(`browser: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
