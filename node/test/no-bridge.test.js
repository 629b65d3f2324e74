'use strict';
// Run without the bridge: a clear error (never a hang), or the fallback port if asked.
const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { spawn } = require('node:child_process');
const { once } = require('node:events');
const { FakeBridge } = require('./helpers/fake-bridge');
const { get } = require('./helpers/client');
const { ENV_INDEX } = require('./helpers/internals');

const APP = path.join(__dirname, 'apps', 'http-app.js');
const LIMIT = { timeout: 20000 };

/** `node app.js` as a user would run it: no IPC channel. */
function runPlain(env = {}) {
  const child = spawn(process.execPath, [APP], {
    env: { ...process.env, [ENV_INDEX]: '1', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const out = { stdout: '', stderr: '' };
  child.stdout.setEncoding('utf8').on('data', (d) => (out.stdout += d));
  child.stderr.setEncoding('utf8').on('data', (d) => (out.stderr += d));
  const exited = once(child, 'exit').then(([code, signal]) => ({ code, signal }));
  return { child, out, exited };
}

test('plain `node app.js`: exits 1 saying how to start it', LIMIT, async () => {
  const { out, exited } = runPlain();
  assert.deepEqual(await exited, { code: 1, signal: null });
  assert.match(out.stderr, /NoBridgeError/);
  assert.match(out.stderr, /no IPC channel/);
  assert.match(out.stderr, /sticky-dispatch node-worker -- node app\.js/);
  assert.match(out.stderr, /sticky-dispatch --listen 127\.0\.0\.1:8080 --workers 4 -- sticky-dispatch node-worker -- node app\.js/);
  assert.match(out.stderr, /fallbackPort/);
  assert.match(out.stderr, /cargo install --path \./, 'where the sticky-dispatch binary comes from');
});

test(`an IPC channel that is not the bridge (no ${ENV_INDEX}): exits 1`, LIMIT, async (t) => {
  const bridge = new FakeBridge(APP, { index: null });
  t.after(() => bridge.close());
  assert.deepEqual(await bridge.exited, { code: 1, signal: null });
  assert.ok(
    bridge.stderr.includes(`not from sticky-dispatch (${ENV_INDEX} is not set)`),
    `names the variable: ${bridge.stderr}`,
  );
  assert.deepEqual(bridge.protocolMessages(), [], 'never told anyone it was ready');
});

test('fallbackPort: listens there directly, the socket its own peer', LIMIT, async (t) => {
  const { child, out, exited } = runPlain({ APP_FALLBACK_PORT: '0' });
  t.after(() => child.kill('SIGKILL'));
  while (!/listening port=\d+/.test(out.stdout)) {
    const [what] = await Promise.race([once(child.stdout, 'data'), exited.then(() => ['exit'])]);
    if (what === 'exit') assert.fail(`exited: ${out.stderr}`);
  }
  const port = Number(/listening port=(\d+)/.exec(out.stdout)[1]);
  const { status, json } = await get(port, '/');
  assert.equal(status, 200);
  // Node's default host is :: (dual stack): the IPv4 client shows as IPv4-mapped.
  assert.match(json.remoteAddress, /^(::ffff:)?127\.0\.0\.1$/);
  assert.equal(json.info, null);
});

// The forms the docs show: without an options object there is no fallback either.
for (const [form, call] of [
  ['listen(server)', "require(INDEX).listen(server)"],
  ['listen(server, cb)', "require(INDEX).listen(server, () => console.log('listening'))"],
  ['listen(server, undefined, cb)', "require(INDEX).listen(server, undefined, () => console.log('listening'))"],
]) {
  test(`plain \`node app.js\` with ${form}: exits 1 with NoBridgeError, never serves`, LIMIT, async (t) => {
    const source = `const INDEX = ${JSON.stringify(path.join(__dirname, '..', 'index.js'))};
const server = require('node:http').createServer((req, res) => res.end('served'));
${call};`;
    const child = spawn(process.execPath, ['-e', source], {
      env: { ...process.env, [ENV_INDEX]: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    t.after(() => child.kill('SIGKILL'));
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d) => (stderr += d));
    const [code, signal] = await once(child, 'exit');
    assert.deepEqual({ code, signal }, { code: 1, signal: null });
    assert.match(stderr, /NoBridgeError/);
    assert.doesNotMatch(stdout, /listening/);
  });
}
