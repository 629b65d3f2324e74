'use strict';
// WorkerSession, the package's state machine toward sticky-dispatch, without a process:
// each transition of index.js's diagram, on a fake channel (helpers/fake-channel.js).
const test = require('node:test');
const assert = require('node:assert/strict');
const net = require('node:net');
const { once } = require('node:events');
const { WorkerSession, StickyServer, DEFAULT_DRAIN_TIMEOUT } = require('./helpers/internals');
const { FakeChannel, tcpPair, serving } = require('./helpers/fake-channel');
const { connectionInfo } = require('..');

const LIMIT = { timeout: 10000 };
const READY = '{"stickyDispatch":"ready"}\n';
const DRAIN_REQUEST = '{"stickyDispatch":"drain-request"}\n';
const synced = (id, draining) => `{"stickyDispatch":"synced","id":"${id}","draining":${draining},"lanes":true}\n`;
const connection = (seq, listener) =>
  JSON.stringify({
    cmd: 'NODE_HANDLE',
    type: 'net.Socket',
    msg: { stickyDispatch: 'connection', seq, peer: null, local: null, listener },
  }) + '\n';

test('idle: nothing listens on the channel, stop and drain change nothing', LIMIT, () => {
  const channel = new FakeChannel();
  const session = new WorkerSession(channel);
  assert.equal(session.state, 'idle');
  session.stop('SIGTERM');
  session.drain('bridge');
  assert.equal(session.state, 'idle');
  assert.equal(channel.listenerCount('message'), 0);
  assert.deepEqual(channel.sent, []);
});

test('idle → serving: listen() installs the listeners; one ready, after the tick, for every server of the tick', LIMIT, async () => {
  const channel = new FakeChannel();
  const session = new WorkerSession(channel);
  const servers = [net.createServer(), net.createServer()];
  const listening = servers.map((server) => once(server, 'listening'));
  session.add(new StickyServer(servers[0], 'web', 'bridge', session), {});
  session.add(new StickyServer(servers[1], 'api', 'bridge', session), { drainTimeout: 5 });
  assert.equal(session.state, 'serving');
  for (const event of ['message', 'disconnect', 'SIGTERM', 'SIGINT']) assert.equal(channel.listenerCount(event), 1, event);
  assert.deepEqual(channel.sent, [], 'not in the tick of listen()');
  await Promise.all(listening);
  assert.deepEqual(channel.sent, [READY]);
  // The largest drainTimeout given, at least the default of a call without one.
  assert.equal(session.drainTimeout, DEFAULT_DRAIN_TIMEOUT);
  // A server given later only gets 'listening'.
  const later = net.createServer();
  session.add(new StickyServer(later, null, 'bridge', session), {});
  await once(later, 'listening');
  assert.deepEqual(channel.sent, [READY]);
});

test('serving: listen() for a listener already served throws', LIMIT, async (t) => {
  const { session } = await serving(t, { listeners: [null, 'web'] });
  assert.throws(() => session.add(new StickyServer(net.createServer(), 'web', 'bridge', session), {}), /listener "web" was already given/);
  assert.throws(() => session.add(new StickyServer(net.createServer(), null, 'bridge', session), {}), /without `listener` was already called/);
});

test('serving: sync is answered synced, draining false (the sync → synced answer)', LIMIT, async (t) => {
  const { channel, session } = await serving(t);
  channel.deliver('{"stickyDispatch":"sync","id":"42-1"}\n');
  channel.deliver('{"stickyDispatch":"sync","id":"42-2"}\n');
  assert.deepEqual(channel.sent, [READY, synced('42-1', false), synced('42-2', false)]);
  assert.equal(session.state, 'serving');
});

test('serving: a connection goes to the server of its listener, else to the one without', LIMIT, async (t) => {
  const { channel, handles } = await serving(t, { listeners: ['web', null] });
  const got = handles.map(() => []);
  handles.forEach((handle, i) => handle.on('connection', (socket, info) => got[i].push(info.listener)));
  for (const listener of ['web', 'api', 'web']) channel.deliver(connection(1, listener), (await tcpPair(t)).socket);
  assert.deepEqual(got, [['web', 'web'], ['api']]);
  assert.deepEqual(handles.map((h) => h.sockets.size), [2, 1]);
});

test('serving: a connection for a listener no server takes is closed', LIMIT, async (t) => {
  const { channel, handles } = await serving(t, { listeners: ['web'] });
  const { socket, client } = await tcpPair(t);
  channel.deliver(connection(1, 'api'), socket);
  assert.ok(socket.destroyed);
  await once(client, 'close');
  assert.equal(handles[0].sockets.size, 0);
});

test('serving → stopping (SIGTERM): drain-request once, still takes connections, sync says draining', LIMIT, async (t) => {
  const { channel, session, handles } = await serving(t);
  channel.emit('SIGTERM', 'SIGTERM');
  channel.emit('SIGINT', 'SIGINT');
  handles[0].close();
  assert.equal(session.state, 'stopping');
  assert.equal(session.reason, 'SIGTERM');
  const { socket } = await tcpPair(t);
  channel.deliver(connection(1, 'web'), socket);
  assert.equal(connectionInfo(socket).seq, 1, 'the dispatcher may have had it in flight');
  channel.deliver('{"stickyDispatch":"sync","id":"42-3"}\n');
  assert.deepEqual(channel.sent, [READY, DRAIN_REQUEST, synced('42-3', true)]);
  assert.throws(() => session.add(new StickyServer(net.createServer(), 'late', 'bridge', session), {}), /began to stop/);
});

test('stopping → draining (drain) → closed: reason bridge, servers closed, exit once', LIMIT, async (t) => {
  const { channel, session, handles } = await serving(t);
  const reasons = [];
  handles[0].on('drain', (reason) => reasons.push(reason));
  channel.emit('SIGTERM', 'SIGTERM');
  channel.deliver('{"stickyDispatch":"drain"}\n');
  assert.equal(session.state, 'draining');
  assert.equal(handles[0].draining, true);
  channel.deliver('{"stickyDispatch":"drain"}\n');
  assert.deepEqual(reasons, ['bridge']);
  await channel.exited;
  await handles[0].closed;
  assert.equal(session.state, 'closed');
  assert.equal(channel.exits, 1);
  assert.equal(channel.listenerCount('message'), 0);
  assert.equal(channel.listenerCount('disconnect'), 0);
});

test('serving → draining when the channel closes: reason disconnect', LIMIT, async (t) => {
  const { channel, session, handles } = await serving(t);
  const drained = once(handles[0], 'drain');
  channel.emit('disconnect');
  assert.deepEqual(await drained, ['disconnect']);
  assert.deepEqual(channel.sent, [READY], 'no drain-request: nobody to ask');
  await channel.exited;
  assert.equal(session.state, 'closed');
});

test('stopping → draining at the deadline when no drain comes: reason timeout', LIMIT, async (t) => {
  const { channel, session, handles } = await serving(t, { options: { drainTimeout: 20 } });
  const drained = once(handles[0], 'drain');
  channel.emit('SIGTERM', 'SIGTERM');
  assert.deepEqual(await drained, ['timeout']);
  await channel.exited;
  assert.equal(session.state, 'closed');
});

test('draining: a connection is closed unanswered, sync says draining; closed once the last one closes', LIMIT, async (t) => {
  const { channel, session, handles } = await serving(t);
  const open = await tcpPair(t);
  channel.deliver(connection(1, 'web'), open.socket);
  channel.deliver('{"stickyDispatch":"drain"}\n');
  assert.equal(session.state, 'draining');
  const late = await tcpPair(t);
  channel.deliver(connection(2, 'web'), late.socket);
  assert.ok(late.socket.destroyed);
  assert.equal(connectionInfo(late.socket), undefined);
  channel.deliver('{"stickyDispatch":"sync","id":"42-4"}\n');
  assert.deepEqual(channel.sent, [READY, synced('42-4', true)]);
  assert.equal(session.state, 'draining', 'the connection handed before the drain is still open');
  open.client.end();
  await channel.exited;
  assert.equal(session.state, 'closed');
  assert.equal(handles[0].sockets.size, 0);
});

test('draining → closed at the deadline: what is still open is cut', LIMIT, async (t) => {
  const { channel, session } = await serving(t, { options: { drainTimeout: 30 } });
  const { socket, client } = await tcpPair(t);
  channel.deliver(connection(1, 'web'), socket);
  channel.deliver('{"stickyDispatch":"drain"}\n');
  await channel.exited;
  assert.equal(session.state, 'closed');
  assert.ok(socket.destroyed);
  await once(client, 'close');
});

test('closed with exit: false: lets go of the channel instead of exiting', LIMIT, async (t) => {
  const { channel, session, handles } = await serving(t, { options: { exit: false } });
  channel.deliver('{"stickyDispatch":"drain"}\n');
  await handles[0].closed;
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(session.state, 'closed');
  assert.equal(channel.disconnects, 1);
  assert.equal(channel.exits, 0);
});
