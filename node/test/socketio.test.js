'use strict';
// socket.io: tests/node/apps/chat.js (the package under a real socket.io server) against
// tests/node/socketio-clients.js (real socket.io-client, long-polling, one new connection
// per request), each client from its own 127.0.1.x address. Needs `npm ci --prefix tests/node`
// (CI runs it first): without it the test fails and says so, rather than pass untested.
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');
const { execFile } = require('node:child_process');
const { FakeBridge } = require('./helpers/fake-bridge');

const TESTS_NODE = path.join(__dirname, '..', '..', 'tests', 'node');
const CHAT = path.join(TESTS_NODE, 'apps', 'chat.js');
const CLIENTS = path.join(TESTS_NODE, 'socketio-clients.js');
const installed = fs.existsSync(path.join(TESTS_NODE, 'node_modules', 'socket.io'));

/** The client address the dispatcher reports for a real source 127.0.1.N: 198.51.100.N. */
function reported(ip) {
  return `198.51.100.${ip.split('.')[3]}`;
}

test(
  'socket.io chat: handshake, rooms and messages on one worker; handshake.address is the reported client',
  { timeout: 60000 },
  async (t) => {
    assert.ok(installed, `${TESTS_NODE} has no node_modules/socket.io: run \`npm ci --prefix tests/node\` first`);
    const started = Date.now();
    const bridge = new FakeBridge(CHAT, { index: '2', env: { CHAT_READY_DELAY_MS: '300' } });
    t.after(() => bridge.close());
    await bridge.message((m) => m.stickyDispatch === 'ready');
    assert.ok(Date.now() - started >= 300, 'ready only once the app listens, after its start-up delay');
    const port = await bridge.listen((seq, socket) => ({
      peer: { address: reported(socket.remoteAddress), port: socket.remotePort, family: 'IPv4' },
      local: { address: socket.localAddress, port: socket.localPort, family: 'IPv4' },
      listener: 'web',
    }));
    const ips = Array.from({ length: 10 }, (_, i) => `127.0.1.${i + 1}`);
    const output = await new Promise((resolve, reject) =>
      execFile(process.execPath, [CLIENTS, `http://127.0.0.1:${port}`, ...ips], { env: { ...process.env, PHASE_MS: '10000' } },
        (err, stdout, stderr) => (err ? reject(new Error(`${err.message}\n${stdout}\n${stderr}`)) : resolve(stdout))),
    );
    assert.match(output, /^summary clients=10 ok=10 failed=0$/m, output);
    for (const ip of ips) {
      const line = output.split('\n').find((l) => l.startsWith(`client ip=${ip} `));
      assert.ok(line, `a line for ${ip}`);
      assert.match(line, new RegExp(`worker=2 pid=\\d+ client=${reported(ip).replaceAll('.', '\\.')} `));
      // Everyone is on the one worker: each received the messages of its whole room.
      assert.match(line, /received=2 expected=2/);
    }
    assert.ok(bridge.seq > 30, `long-polling: many connections (${bridge.seq}), all to this worker`);

    // The drain closes socket.io and the process exits 0.
    bridge.drain();
    assert.deepEqual(await bridge.exited, { code: 0, signal: null });
  },
);

test(
  "drain with socket.io and no 'drain' handler: its sessions end at once, clients can reconnect, a request in progress finishes",
  { timeout: 60000 },
  async (t) => {
    assert.ok(installed, `${TESTS_NODE} has no node_modules/socket.io: run \`npm ci --prefix tests/node\` first`);
    const { io } = require(path.join(TESTS_NODE, 'node_modules', 'socket.io-client'));
    // The chat as socket.io's examples write it: nothing closes socket.io on the drain.
    // drainTimeout stays 30 s: only the package ending the sessions stops the app in time.
    const bridge = new FakeBridge(CHAT, { env: { CHAT_CLOSE_ON_DRAIN: '0' } });
    t.after(() => bridge.close());
    await bridge.message((m) => m.stickyDispatch === 'ready');
    const port = await bridge.listen();
    const clients = ['websocket', 'polling'].map((transport) => {
      const socket = io(`http://127.0.0.1:${port}`, { transports: [transport], forceNew: true, reconnection: false });
      t.after(() => socket.close());
      const hello = new Promise((resolve) => socket.once('hello', resolve));
      const gone = new Promise((resolve) => socket.once('disconnect', resolve));
      return { transport, socket, hello, gone };
    });
    for (const c of clients) await c.hello;
    // An ordinary request in progress at the drain: its `started` has arrived.
    const slow = await new Promise((resolve, reject) => {
      http
        .get({ host: '127.0.0.1', port, path: '/slow?ms=500', agent: false }, (res) => {
          res.setEncoding('utf8');
          let body = '';
          const whole = new Promise((done) => res.on('end', () => done({ status: res.statusCode, body })));
          res.on('data', (d) => {
            body += d;
            if (body.startsWith('started')) resolve({ whole });
          });
        })
        .on('error', reject);
    });
    const begun = Date.now();
    bridge.drain();
    for (const c of clients) {
      // The reasons socket.io-client reconnects from (not 'io server disconnect').
      assert.match(await c.gone, /^transport (close|error)$/, c.transport);
    }
    const res = await slow.whole;
    assert.equal(res.status, 200);
    assert.match(res.body, /^started\nfinished\n/);
    assert.deepEqual(await bridge.exited, { code: 0, signal: null });
    const took = Date.now() - begun;
    assert.ok(took < 5000, `exited ${took} ms after the drain, not at the 30 s drain timeout`);
  },
);
