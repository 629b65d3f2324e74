// Drives headless Chromium over the DevTools protocol for tests/browser.rs (the Rust demo's
// page) and tests/node_worker.rs (the Node chat's page, tests/node/apps/chat.html):
//
//   node browser.js BROWSER_WS_URL PAGE_URL SCREENSHOT.png MESSAGE
//
// Opens PAGE_URL in a new tab, waits for the chat to join its room, types MESSAGE into
// the chat box and presses Enter, waits to see it come back from the server, takes a
// screenshot, and prints what it saw as `key=value` lines:
//   who=<the page's worker=... line>  hello=<socket.io's hello line>
//   echoed=true|false  status=<the page's status line>  state=<the page's state>
"use strict";

const fs = require("node:fs");
const WebSocket = require("ws");

const [browserUrl, pageUrl, screenshot, message] = process.argv.slice(2);
if (!message) {
  console.error("usage: node browser.js BROWSER_WS_URL PAGE_URL SCREENSHOT.png MESSAGE");
  process.exit(2);
}
const STEP_MS = Number(process.env.STEP_MS || 30000);

/// A DevTools connection: `send(method, params, sessionId)` resolves with the result.
function connect(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { perMessageDeflate: false });
    const pending = new Map();
    let next = 1;
    ws.on("message", (data) => {
      const msg = JSON.parse(data);
      if (msg.id && pending.has(msg.id)) {
        const { resolve, reject, method } = pending.get(msg.id);
        pending.delete(msg.id);
        if (msg.error) reject(new Error(`${method}: ${msg.error.message}`));
        else resolve(msg.result);
      } else if (msg.method === "Runtime.consoleAPICalled") {
        const text = msg.params.args.map((a) => a.value ?? a.description ?? "").join(" ");
        console.error(`page console.${msg.params.type}: ${text}`);
      } else if (msg.method === "Runtime.exceptionThrown") {
        console.error(`page exception: ${JSON.stringify(msg.params.exceptionDetails)}`);
      }
    });
    ws.on("open", () =>
      resolve({
        send(method, params = {}, sessionId) {
          const id = next++;
          ws.send(JSON.stringify({ id, method, params, sessionId }));
          return new Promise((resolve, reject) => pending.set(id, { resolve, reject, method }));
        },
        close: () => ws.close(),
      }),
    );
    ws.on("error", reject);
  });
}

async function main() {
  const cdp = await connect(browserUrl);
  const { targetId } = await cdp.send("Target.createTarget", { url: "about:blank" });
  const { sessionId } = await cdp.send("Target.attachToTarget", { targetId, flatten: true });
  const page = (method, params) => cdp.send(method, params, sessionId);
  const evaluate = async (expression) =>
    (await page("Runtime.evaluate", { expression, returnByValue: true })).result.value;
  const waitFor = async (what, expression) => {
    const until = Date.now() + STEP_MS;
    for (;;) {
      const value = await evaluate(expression);
      if (value) return value;
      if (Date.now() > until) {
        const state = await evaluate("document.body && document.body.dataset.state");
        const status = await evaluate("document.getElementById('status')?.textContent");
        throw new Error(`${what}: not within ${STEP_MS} ms (state=${state}, status=${status})`);
      }
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
  };

  await page("Runtime.enable");
  await page("Page.enable");
  await page("Emulation.setDeviceMetricsOverride", {
    width: 900,
    height: 700,
    deviceScaleFactor: 1,
    mobile: false,
  });
  await page("Page.navigate", { url: pageUrl });
  const state = await waitFor(
    "the chat joins its room",
    "['joined', 'error', 'unavailable', 'disconnected'].includes(document.body?.dataset.state) && document.body.dataset.state",
  );
  let echoed = false;
  if (state === "joined") {
    // Type like a person: focus the box, insert the text, press Enter.
    await evaluate("document.getElementById('text').focus()");
    await page("Input.insertText", { text: message });
    const enter = { key: "Enter", code: "Enter", windowsVirtualKeyCode: 13 };
    await page("Input.dispatchKeyEvent", { type: "keyDown", text: "\r", ...enter });
    await page("Input.dispatchKeyEvent", { type: "keyUp", ...enter });
    echoed = Boolean(
      await waitFor(
        "the message comes back from the server",
        `[...document.querySelectorAll('#messages li.message')].some((li) => li.textContent.endsWith(${JSON.stringify(message)}))`,
      ),
    );
  }
  const shot = await page("Page.captureScreenshot", { format: "png" });
  fs.writeFileSync(screenshot, Buffer.from(shot.data, "base64"));
  const line = (key, expression) => evaluate(expression).then((v) => console.log(`${key}=${v ?? ""}`));
  await line("who", "document.getElementById('who').textContent.trim().split('\\n')[0]");
  await line("hello", "document.body.dataset.who");
  await line("status", "document.getElementById('status').textContent");
  await line("state", "document.body.dataset.state");
  console.log(`echoed=${echoed}`);
  await cdp.send("Browser.close").catch(() => {});
  cdp.close();
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(err);
    process.exit(1);
  },
);
