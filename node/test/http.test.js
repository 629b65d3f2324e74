'use strict';
// The package over a real IPC channel (see helpers/fake-bridge.js): readiness, the real
// client address, keep-alive, IPv6, routing by listener, the index.
const test = require('node:test');
const assert = require('node:assert/strict');
const http = require('node:http');
const path = require('node:path');
const { FakeBridge } = require('./helpers/fake-bridge');
const { get } = require('./helpers/client');
const { ENV_INDEX } = require('./helpers/internals');

const APP = path.join(__dirname, 'apps', 'http-app.js');

test('listen() sends ready, after emitting listening on the server', async (t) => {
  const bridge = new FakeBridge(APP);
  t.after(() => bridge.close());
  await bridge.message((m) => m.stickyDispatch === 'ready');
  // The app's 'listening' handler ran first: its message precedes ready on the channel.
  assert.deepEqual(bridge.messages, [{ app: 'listening' }, { stickyDispatch: 'ready' }]);
});

test('http: the app sees the client from the message, not the socket peer', async (t) => {
  const bridge = new FakeBridge(APP);
  t.after(() => bridge.close());
  await bridge.message((m) => m.stickyDispatch === 'ready');
  const port = await bridge.listen();
  const { status, json } = await get(port, '/');
  assert.equal(status, 200);
  assert.equal(json.remoteAddress, '198.51.100.1');
  assert.equal(json.remotePort, 40001);
  assert.equal(json.remoteFamily, 'IPv4');
  assert.equal(json.localAddress, '127.0.0.1');
  assert.equal(json.localPort, port);
  assert.deepEqual(json.info, {
    seq: 1,
    peer: { address: '198.51.100.1', port: 40001, family: 'IPv4' },
    local: { address: '127.0.0.1', port, family: 'IPv4' },
    listener: 'web',
  });
  assert.equal(json.index, 3);
  assert.equal(json.workerIndex, 3);
  assert.notEqual(json.pid, process.pid);
});

test('http keep-alive: later requests on the connection see the same client', async (t) => {
  const bridge = new FakeBridge(APP);
  t.after(() => bridge.close());
  await bridge.message((m) => m.stickyDispatch === 'ready');
  const port = await bridge.listen();
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  t.after(() => agent.destroy());
  const first = await get(port, '/', { agent });
  const second = await get(port, '/', { agent });
  assert.equal(bridge.seq, 1, 'one connection for both requests');
  assert.equal(first.headers.connection, 'keep-alive');
  for (const { json } of [first, second]) {
    assert.equal(json.remoteAddress, '198.51.100.1');
    assert.equal(json.info.seq, 1);
  }
});

test('IPv6 client, and a null peer falls back to the socket its own', async (t) => {
  const bridge = new FakeBridge(APP);
  t.after(() => bridge.close());
  await bridge.message((m) => m.stickyDispatch === 'ready');
  const peers = [
    { address: '2001:db8::7', port: 50007, family: 'IPv6' },
    null,
    // A malformed one counts as none: the socket's own address, never garbage.
    { address: 'not an address', port: 1, family: 'IPv4' },
  ];
  const port = await bridge.listen((seq, socket) => ({
    peer: peers[seq - 1],
    local: null,
    listener: 'web',
  }));
  const v6 = await get(port, '/');
  assert.equal(v6.json.remoteAddress, '2001:db8::7');
  assert.equal(v6.json.remotePort, 50007);
  assert.equal(v6.json.remoteFamily, 'IPv6');
  assert.equal(v6.json.localAddress, '127.0.0.1', 'no local in the message: the socket its own');
  for (let i = 0; i < 2; i++) {
    const { json } = await get(port, '/');
    assert.equal(json.remoteAddress, '127.0.0.1');
    assert.equal(json.info.peer, null);
  }
});

test('several servers: each takes the connections of its listener', async (t) => {
  const bridge = new FakeBridge(path.join(__dirname, 'apps', 'two-listeners.js'));
  t.after(() => bridge.close());
  await bridge.message((m) => m.stickyDispatch === 'ready');
  assert.equal(bridge.protocolMessages().length, 1, 'one ready for both servers');
  let listener = 'api';
  const port = await bridge.listen((seq, socket) => ({ peer: null, local: null, listener }));
  assert.equal((await get(port, '/')).body, 'api');
  listener = 'web';
  assert.equal((await get(port, '/')).body, 'web');
  // No server for it (and no catch-all): closed, not hung.
  listener = 'admin';
  await assert.rejects(get(port, '/'), /socket hang up|ECONNRESET/);
});

test('close() asks the dispatcher to drain, like SIGTERM', async (t) => {
  const bridge = new FakeBridge(APP);
  t.after(() => bridge.close());
  await bridge.message((m) => m.stickyDispatch === 'ready');
  const port = await bridge.listen();
  const { status } = await get(port, '/stop');
  assert.equal(status, 200);
  await bridge.message((m) => m.stickyDispatch === 'drain-request');
  bridge.drain();
  assert.deepEqual(await bridge.exited, { code: 0, signal: null });
});

test('listen() rejects what is not a server', async () => {
  const sticky = require('..');
  assert.throws(() => sticky.listen({}), TypeError);
  assert.throws(() => sticky.listen(http.createServer(), { drainTimeout: -1 }), TypeError);
  assert.throws(() => sticky.listen(http.createServer(), { fallbackPort: 'eighty' }), TypeError);
});

test('index is null outside the bridge', () => {
  // This test process has no STICKY_DISPATCH_INDEX (the runner does not set it).
  assert.equal(process.env[ENV_INDEX], undefined);
  const sticky = require('..');
  assert.equal(sticky.index, null);
  assert.equal(sticky.workerIndex(), null);
});
