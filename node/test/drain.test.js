'use strict';
// Stopping: the dispatcher's drain, SIGTERM to node, the IPC channel going away, the drain
// timeout. Every wait is for an event (a message, a response, an exit), never a sleep.
const test = require('node:test');
const assert = require('node:assert/strict');
const net = require('node:net');
const path = require('node:path');
const { once } = require('node:events');
const { FakeBridge } = require('./helpers/fake-bridge');
const { get } = require('./helpers/client');

const APP = path.join(__dirname, 'apps', 'http-app.js');
const LIMIT = { timeout: 20000 };

async function started(t, env) {
  const bridge = new FakeBridge(APP, { env });
  t.after(() => bridge.close());
  await bridge.message((m) => m.stickyDispatch === 'ready');
  const port = await bridge.listen();
  return { bridge, port };
}

test('drain: the request in flight is answered, then the app exits 0', LIMIT, async (t) => {
  const { bridge, port } = await started(t);
  const slow = get(port, '/slow');
  await bridge.message((m) => m.app === 'slow-started');
  bridge.drain();
  const res = await slow;
  assert.equal(res.status, 200);
  assert.equal(res.json.answered, 'after drain began');
  assert.equal(res.json.remoteAddress, '198.51.100.1');
  assert.equal(res.headers.connection, 'close', 'its connection is not kept alive');
  assert.deepEqual(await bridge.exited, { code: 0, signal: null });
  assert.ok(bridge.messages.some((m) => m.app === 'drain' && m.reason === 'bridge'));
});

test("the server emits 'close' only at the drain, not whenever it has no connection", LIMIT, async (t) => {
  const { bridge, port } = await started(t);
  for (const seq of [1, 2]) {
    assert.equal((await get(port, '/')).status, 200);
    await bridge.message((m) => m.app === 'connection-closed' && m.seq === seq);
  }
  // Messages arrive in order: a 'close' emitted when connection 1 closed would be here.
  assert.ok(!bridge.messages.some((m) => m.app === 'server-close'), 'no close while serving');
  bridge.drain();
  await bridge.message((m) => m.app === 'server-close');
  assert.deepEqual(await bridge.exited, { code: 0, signal: null });
});

test('drain: an idle keep-alive connection is closed at once', LIMIT, async (t) => {
  // Drain and keep-alive timeouts far beyond the test's limit: only closing the idle
  // connection at the drain ends it in time.
  const { bridge, port } = await started(t, { APP_DRAIN_TIMEOUT: '600000', APP_KEEP_ALIVE_TIMEOUT: '600000' });
  const client = net.connect(port, '127.0.0.1');
  client.setEncoding('utf8');
  let received = '';
  client.on('data', (d) => (received += d));
  client.write('GET / HTTP/1.1\r\nHost: test\r\n\r\n');
  while (!received.includes('"pid"')) await once(client, 'data');
  assert.match(received, /^HTTP\/1.1 200/);
  assert.match(received, /keep-alive/i);
  const closed = once(client, 'close');
  bridge.drain();
  await closed;
  assert.deepEqual(await bridge.exited, { code: 0, signal: null });
});

test('drain: a connection handed over just before it, whose request comes after it, is answered', LIMIT, async (t) => {
  // The app's server.closeIdleConnections() destroys connections that have not sent a
  // request yet, as Node's own does in the releases with nodejs/node#63470 (Node 20
  // keeps them). Drain and keep-alive timeouts far beyond the test's limit: only serving
  // the late request and closing its connection ends the drain.
  const { bridge, port } = await started(t, {
    APP_DRAIN_TIMEOUT: '600000',
    APP_KEEP_ALIVE_TIMEOUT: '600000',
    APP_CLOSE_IDLE_PRE_REQUEST: '1',
  });
  // A keep-alive connection that has served a request (idle at the drain: closed then)...
  const served = net.connect(port, '127.0.0.1');
  served.setEncoding('utf8');
  let servedText = '';
  served.on('data', (d) => (servedText += d));
  served.write('GET / HTTP/1.1\r\nHost: test\r\n\r\n');
  while (!servedText.includes('"pid"')) await once(served, 'data');
  const servedClosed = once(served, 'close');
  // ... and one handed over without its request yet.
  const late = net.connect(port, '127.0.0.1');
  late.setEncoding('utf8');
  let lateText = '';
  late.on('data', (d) => (lateText += d));
  late.on('error', () => {}); // a reset shows as a missing answer below
  const lateClosed = once(late, 'close');
  await bridge.message((m) => m.app === 'connection-opened' && m.seq === 2);
  bridge.drain();
  // The app sends this from its 'drain' handler, inside the package's drain: the drain
  // has run before the request's first byte leaves.
  await bridge.message((m) => m.app === 'drain');
  await servedClosed;
  assert.equal(lateText, '', 'nothing sent to it yet');
  late.write('GET / HTTP/1.1\r\nHost: test\r\n\r\n');
  // Bounded: a connection answered with keep-alive would stay open for 600 s.
  const kept = new Promise((resolve) => setTimeout(resolve, 5000, 'still open').unref());
  assert.notEqual(await Promise.race([lateClosed, kept]), 'still open', `closed after its answer: ${JSON.stringify(lateText)}`);
  assert.match(lateText, /^HTTP\/1.1 200/, `answered, not cut: ${JSON.stringify(lateText)}`);
  assert.match(lateText, /connection: close/i, 'its connection ends after the answer');
  assert.match(lateText, /"remoteAddress":"198.51.100.2"/);
  assert.deepEqual(await bridge.exited, { code: 0, signal: null });
});

test('drain: a keep-alive response whose headers went out ends its connection after it', LIMIT, async (t) => {
  const { bridge, port } = await started(t, { APP_DRAIN_TIMEOUT: '600000', APP_KEEP_ALIVE_TIMEOUT: '600000' });
  const client = net.connect(port, '127.0.0.1');
  client.setEncoding('utf8');
  let received = '';
  client.on('data', (d) => (received += d));
  client.write('GET /stream HTTP/1.1\r\nHost: test\r\n\r\n');
  await bridge.message((m) => m.app === 'stream-started');
  while (!received.includes('first part;')) await once(client, 'data');
  assert.match(received, /connection: keep-alive/i, 'promised keep-alive before the drain');
  const closed = once(client, 'close');
  bridge.drain();
  await closed;
  assert.match(received, /last part\r\n0\r\n\r\n$/, 'the whole chunked body, then the close');
  assert.deepEqual(await bridge.exited, { code: 0, signal: null });
});

test('drain: what is still open at the drain timeout is cut, exit 0', LIMIT, async (t) => {
  const { bridge, port } = await started(t, { APP_DRAIN_TIMEOUT: '300' });
  const hang = get(port, '/hang');
  await bridge.message((m) => m.app === 'hang-started');
  const begun = Date.now();
  bridge.drain();
  await assert.rejects(hang, /socket hang up|ECONNRESET/);
  assert.deepEqual(await bridge.exited, { code: 0, signal: null });
  assert.ok(Date.now() - begun >= 250, 'it waited for the drain timeout first');
});

test('drain: a connection arriving after it is closed unanswered', LIMIT, async (t) => {
  // /hang keeps the app draining (until the 2 s timeout) while the late one arrives.
  const { bridge, port } = await started(t, { APP_DRAIN_TIMEOUT: '2000' });
  const hang = get(port, '/hang');
  await bridge.message((m) => m.app === 'hang-started');
  bridge.drain();
  await bridge.message((m) => m.app === 'drain');
  await assert.rejects(get(port, '/'), /socket hang up|ECONNRESET/);
  await assert.rejects(hang, /socket hang up|ECONNRESET/);
  assert.deepEqual(await bridge.exited, { code: 0, signal: null });
  assert.match(bridge.stderr, /a connection arrived after the drain began/);
});

test('SIGTERM to node: drain-request, still serving, exits after the drain', LIMIT, async (t) => {
  const { bridge, port } = await started(t);
  bridge.child.kill('SIGTERM');
  await bridge.message((m) => m.stickyDispatch === 'drain-request');
  // The dispatcher still had connections in flight for it: they are served.
  const res = await get(port, '/');
  assert.equal(res.status, 200);
  assert.equal(res.json.remoteAddress, '198.51.100.1');
  assert.equal(bridge.child.exitCode, null, 'SIGTERM alone does not stop it');
  bridge.drain();
  assert.deepEqual(await bridge.exited, { code: 0, signal: null });
  assert.deepEqual(bridge.protocolMessages(), [{ stickyDispatch: 'ready' }, { stickyDispatch: 'drain-request' }]);
});

test('SIGTERM and no drain from the dispatcher: it stops at the drain timeout', LIMIT, async (t) => {
  const { bridge } = await started(t, { APP_DRAIN_TIMEOUT: '300' });
  bridge.child.kill('SIGTERM');
  await bridge.message((m) => m.stickyDispatch === 'drain-request');
  await bridge.message((m) => m.app === 'drain' && m.reason === 'timeout');
  assert.deepEqual(await bridge.exited, { code: 0, signal: null });
});

test('IPC channel closed: the request in flight is answered, then exit 0', LIMIT, async (t) => {
  const { bridge, port } = await started(t);
  const slow = get(port, '/slow');
  await bridge.message((m) => m.app === 'slow-started');
  bridge.child.disconnect();
  const res = await slow;
  assert.equal(res.status, 200);
  assert.equal(res.json.answered, 'after drain began');
  assert.deepEqual(await bridge.exited, { code: 0, signal: null });
});

test('exit: false lets the app exit by itself after the drain', LIMIT, async (t) => {
  const { bridge, port } = await started(t, { APP_EXIT: 'false' });
  assert.equal((await get(port, '/')).status, 200);
  bridge.drain();
  assert.deepEqual(await bridge.exited, { code: 0, signal: null });
  assert.match(bridge.stdout, /closed: exiting by myself/);
});
