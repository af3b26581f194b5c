#!/usr/bin/node
// Drives headless Chromium (Debian's /usr/bin/chromium) over the DevTools protocol, with npm's
// `ws` as the DevTools client, through the chat demo (examples/chat):
//
//   node spec/peers/chat_browser.js BASE-URL SCREENSHOT.png [BOB-BASE-URL]
//
// Opens BASE-URL/chat?name=alice, waits until it is connected, opens BASE-URL/chat?name=bob,
// waits until alice sees bob join, types a message into alice's page and presses Enter, waits
// until bob's log shows it, takes a screenshot of bob's page into SCREENSHOT.png, then closes
// bob's page and waits until alice sees bob leave. Prints key=value lines (status and log of
// each page, screenshot size), then done=1; on failure error=... and exit 1. Chromium runs with
// a fresh profile directory (removed afterwards) and is always ended before this exits.
'use strict';
const { spawn } = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');
const WebSocket = require('ws');

const CHROMIUM = process.env.MW_CHROMIUM || '/usr/bin/chromium';
const [base, screenshot, bobBase] = process.argv.slice(2);   // bob on another server if given
const MESSAGE = 'hello from alice ✓';
// above the server's deflate_threshold (128 bytes): travels compressed both ways
const LONG = 'a longer one: ' + 'the quick brown fox jumps over the lazy dog; '.repeat(8).trim();
const clean = (v) => (v === undefined || v === null ? '' : String(v)).replace(/[\t\r]/g, ' ').replace(/\n/g, ' | ');
const out = (k, v) => process.stdout.write(`${k}=${clean(v)}\n`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'mw-chromium-'));
let browser = null;
let browserExited = null;

function launch() {
  browser = spawn(CHROMIUM, [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    `--user-data-dir=${profile}`, '--remote-debugging-port=0', '--no-proxy-server',
    '--disable-dev-shm-usage', '--window-size=800,600', 'about:blank',
  ], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  browser.stderr.on('data', (d) => { stderr = (stderr + d).slice(-4000); });
  browserExited = new Promise((resolve) => browser.on('exit', (code, sig) => resolve({ code, sig, stderr })));
}

// The DevTools endpoint: Chromium writes port and path into DevToolsActivePort once listening.
async function endpoint() {
  const file = path.join(profile, 'DevToolsActivePort');
  const deadline = Date.now() + 20000;
  while (Date.now() < deadline) {
    if (browser.exitCode !== null) {
      const r = await browserExited;
      throw new Error(`chromium exited (${r.code}/${r.sig}) before listening: ${r.stderr}`);
    }
    try {
      const [port, p] = fs.readFileSync(file, 'utf8').split('\n');
      if (port && p) return `ws://127.0.0.1:${port.trim()}${p.trim()}`;
    } catch (e) { /* not yet */ }
    await sleep(50);
  }
  throw new Error('chromium did not open its DevTools port within 20 s');
}

let cdp;
let nextId = 0;
const pending = new Map();
function send(method, params = {}, sessionId = undefined) {
  return new Promise((resolve, reject) => {
    const id = ++nextId;
    pending.set(id, { resolve, reject, method });
    cdp.send(JSON.stringify({ id, method, params, sessionId }));
  });
}

async function openPage(url) {
  const { targetId } = await send('Target.createTarget', { url: 'about:blank' });
  const { sessionId } = await send('Target.attachToTarget', { targetId, flatten: true });
  await send('Page.enable', {}, sessionId);
  await send('Runtime.enable', {}, sessionId);
  await send('Page.navigate', { url }, sessionId);
  return { targetId, sessionId };
}

async function evaluate(page, expression) {
  const r = await send('Runtime.evaluate', { expression, returnByValue: true }, page.sessionId);
  if (r.exceptionDetails) throw new Error('page exception: ' + JSON.stringify(r.exceptionDetails));
  return r.result.value;
}

const stateOf = (page) => evaluate(page, `({
  status: (document.getElementById('status') || {}).textContent,
  log: Array.from(document.querySelectorAll('#log div')).map((d) => d.textContent) })`);

async function waitFor(page, what, pred, ms = 10000) {
  const deadline = Date.now() + ms;
  for (;;) {
    let state = null;
    try { state = await stateOf(page); } catch (e) { /* navigating */ }
    if (state && state.status !== undefined && pred(state)) return state;
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}; page state: ${JSON.stringify(state)}`);
    }
    await sleep(50);
  }
}

async function main() {
  launch();
  cdp = new WebSocket(await endpoint(), { perMessageDeflate: false, maxPayload: 256 * 1024 * 1024 });
  cdp.on('message', (data) => {
    const m = JSON.parse(data);
    if (m.id === undefined) return;
    const p = pending.get(m.id);
    if (!p) return;
    pending.delete(m.id);
    if (m.error) p.reject(new Error(`${p.method}: ${JSON.stringify(m.error)}`));
    else p.resolve(m.result);
  });
  await new Promise((resolve, reject) => { cdp.once('open', resolve); cdp.once('error', reject); });
  const version = await send('Browser.getVersion');
  out('browser', version.product);

  const alice = await openPage(`${base}/chat?name=alice`);
  let a = await waitFor(alice, 'alice to connect', (s) => s.status.startsWith('connected as alice'));
  out('alice.status', a.status);
  const bob = await openPage(`${bobBase || base}/chat?name=bob`);
  const b = await waitFor(bob, 'bob to connect', (s) => s.status.startsWith('connected as bob'));
  out('bob.status', b.status);
  a = await waitFor(alice, 'alice to see bob join', (s) => s.log.some((l) => l.includes('bob joined')));

  // alice types the messages and presses Enter, as a person would
  await send('Page.bringToFront', {}, alice.sessionId);
  await evaluate(alice, "document.getElementById('msg').focus(), true");
  for (const text of [MESSAGE, LONG]) {
    await send('Input.insertText', { text }, alice.sessionId);
    for (const type of ['keyDown', 'keyUp']) {
      await send('Input.dispatchKeyEvent', {
        type, key: 'Enter', code: 'Enter', windowsVirtualKeyCode: 13, nativeVirtualKeyCode: 13,
        text: type === 'keyDown' ? '\r' : undefined,
      }, alice.sessionId);
    }
    const wanted = `alice: ${text}`;
    await waitFor(bob, "alice's message in bob's log", (s) => s.log.includes(wanted));
    a = await waitFor(alice, "alice's own message in her log", (s) => s.log.includes(wanted));
  }
  out('bob.log', (await stateOf(bob)).log.join('\n'));
  out('alice.input_after_send', await evaluate(alice, "document.getElementById('msg').value"));

  await send('Page.bringToFront', {}, bob.sessionId);
  const shot = await send('Page.captureScreenshot', { format: 'png' }, bob.sessionId);
  fs.mkdirSync(path.dirname(screenshot), { recursive: true });
  fs.writeFileSync(screenshot, Buffer.from(shot.data, 'base64'));
  out('screenshot_bytes', fs.statSync(screenshot).size);

  await send('Target.closeTarget', { targetId: bob.targetId });
  a = await waitFor(alice, 'alice to see bob leave', (s) => s.log.some((l) => l.includes('bob left')));
  out('alice.log', a.log.join('\n'));
  out('alice.status_end', a.status);
  await send('Target.closeTarget', { targetId: alice.targetId });
}

async function shutdown() {
  if (browser && browser.exitCode === null && browser.signalCode === null) {
    try { if (cdp && cdp.readyState === WebSocket.OPEN) await Promise.race([send('Browser.close'), sleep(2000)]); } catch (e) { /* gone */ }
    const done = await Promise.race([browserExited.then(() => true), sleep(3000).then(() => false)]);
    if (!done) {
      browser.kill('SIGKILL');
      await browserExited;
    }
  }
  if (cdp) cdp.terminate();
  fs.rmSync(profile, { recursive: true, force: true });
}

const watchdog = setTimeout(async () => {
  out('error', 'timed out after 40 s');
  await shutdown();
  process.exit(1);
}, 40000);

main().then(async () => {
  await shutdown();
  clearTimeout(watchdog);
  out('done', 1);
  process.exit(0);
}, async (e) => {
  out('error', e && e.stack ? e.stack : e);
  await shutdown();
  process.exit(1);
});
