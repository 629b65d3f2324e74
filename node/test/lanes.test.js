'use strict';
// Lanes: listening sockets on which the kernel queues this worker's clients, served by the
// package itself (the lane, lanes and accepted lines of tests/vectors/node-ipc.json). The
// sockets are real, and reach the package as Node core makes them of a net.Native line;
// the channel is fake (helpers/fake-channel.js), then a real one (helpers/fake-bridge.js).
const test = require('node:test');
const assert = require('node:assert/strict');
const net = require('node:net');
const path = require('node:path');
const { once } = require('node:events');
const { connectionInfo } = require('..');
const { ACCEPTED_INTERVAL } = require('./helpers/internals');
const { serving, receivedLanes, socketInode, fdsOf, clientFrom } = require('./helpers/fake-channel');
const { FakeBridge } = require('./helpers/fake-bridge');
const { get } = require('./helpers/client');
const { readVectors } = require('./helpers/vectors');

const LIMIT = { timeout: 20000 };
const vectors = readVectors('node-ipc.json');
const toNode = Object.fromEntries(vectors.to_node.map((m) => [m.name, m]));
// Listener 'web' with backlog 4096; 'tls' with 511.
const LANE_WEB = toNode.lane.examples[0];
const LANE_TLS = toNode.lane.examples[1];
const SYNC = toNode.sync.examples[0].line;
const DRAIN = toNode.drain.examples[0].line;
const DRAIN_REQUEST = '{"stickyDispatch":"drain-request"}\n';
const lanes = (count) => JSON.stringify({ stickyDispatch: 'lanes', count }) + '\n';
const acceptedLine = (count) => JSON.stringify({ stickyDispatch: 'accepted', count }) + '\n';

/** Records the backlog `handle` is listened on with. */
function spyListen(handle, backlogs) {
  const own = handle.listen;
  handle.listen = function listen(backlog) {
    backlogs.push(backlog);
    return own.call(this, backlog);
  };
}

/** Connects from `from` to a lane and waits until `sticky` has the connection. */
async function connectThrough(t, sticky, port, from) {
  const got = once(sticky, 'connection');
  const client = await clientFrom(t, port, from);
  const [socket, info] = await got;
  return { client, socket, info };
}

test('lanes: served once the set is complete, with the backlog; clients reach the server of their listener with their own addresses', LIMIT, async (t) => {
  const { channel, session, handles } = await serving(t, { listeners: ['web', null] });
  const [web, tls] = await receivedLanes(t, { sockets: 2 });
  const backlogs = [];
  spyListen(web.handles[0], backlogs);
  spyListen(tls.handles[0], backlogs);
  channel.deliver(LANE_WEB.line, web.handles[0]);
  channel.deliver(LANE_TLS.line, tls.handles[0]);
  assert.deepEqual(backlogs, [], 'held until `lanes`');
  channel.deliver(lanes(2));
  // listen() on the socket again sets its queue's length for every holder: the lane's own.
  assert.deepEqual(backlogs, [LANE_WEB.serve.backlog, LANE_TLS.serve.backlog]);
  assert.equal(session.lanes.size, 2);

  const serverGot = once(handles[0].server, 'connection');
  const { client, socket, info } = await connectThrough(t, handles[0], web.port, '127.0.0.7');
  assert.equal((await serverGot)[0], socket, "the app's server gets it");
  assert.deepEqual(info, {
    seq: null,
    peer: { address: '127.0.0.7', port: client.localPort, family: 'IPv4' },
    local: { address: '127.0.0.1', port: web.port, family: 'IPv4' },
    listener: LANE_WEB.serve.listener,
  });
  assert.equal(connectionInfo(socket), info);
  assert.equal(socket.remoteAddress, '127.0.0.7');
  assert.equal(socket.server, handles[0].server);
  // No server for 'tls': the one without a listener takes it.
  const other = await connectThrough(t, handles[1], tls.port, '127.0.0.8');
  assert.equal(other.info.listener, LANE_TLS.serve.listener);
  assert.deepEqual(handles.map((h) => h.sockets.size), [1, 1]);
  assert.deepEqual(await channel.sentMessage((m) => m.stickyDispatch === 'accepted' && m.count === 2), {
    stickyDispatch: 'accepted',
    count: 2,
  });
});

test('lanes: a lane of a listener no server takes has its clients closed', LIMIT, async (t) => {
  const { channel, handles } = await serving(t, { listeners: ['web'] });
  const [tls] = await receivedLanes(t);
  channel.deliver(LANE_TLS.line, tls.handles[0]);
  channel.deliver(lanes(1));
  handles[0].on('connection', () => assert.fail('not for web'));
  const client = await clientFrom(t, tls.port, '127.0.0.9');
  client.resume();
  await once(client, 'close');
});

test('a new set: the same socket stays with its server (the new fd closed), a lane not in it is closed; a sync alone changes nothing', LIMIT, async (t) => {
  const { channel, session, handles } = await serving(t);
  // Two fds of each socket: the second comes with the next set, or stays with the
  // "dispatcher" (the test).
  const [a, b] = await receivedLanes(t, { sockets: 2, copies: 2 });
  const inodes = [a, b].map((lane) => socketInode(lane.handles[0]));
  channel.deliver(LANE_WEB.line, a.handles[0]);
  channel.deliver(LANE_WEB.line, b.handles[0]);
  channel.deliver(lanes(2));
  const [servingA] = session.lanes.values();
  assert.deepEqual(inodes.map((inode) => fdsOf(inode)), [2, 2]);

  // The dispatcher restarted: until its set comes, the lanes are served.
  channel.deliver(SYNC);
  assert.equal(session.lanes.size, 2);
  await connectThrough(t, handles[0], b.port, '127.0.0.10');

  channel.deliver(LANE_WEB.line, a.handles[1]);
  channel.deliver(lanes(1));
  assert.deepEqual([...session.lanes.values()], [servingA], 'the same server serves a');
  assert.deepEqual(inodes.map((inode) => fdsOf(inode)), [1, 1], "a: the served fd; b: the test's copy alone");
  await connectThrough(t, handles[0], a.port, '127.0.0.11');

  // No lanes at all.
  channel.deliver(SYNC);
  channel.deliver(lanes(0));
  assert.equal(session.lanes.size, 0);
  assert.equal(fdsOf(inodes[0]), 0);
});

test('lanes received before a sync without their set are closed: the new dispatcher sends its own', LIMIT, async (t) => {
  const { channel, session } = await serving(t);
  const [lane] = await receivedLanes(t);
  const inode = socketInode(lane.handles[0]);
  channel.deliver(LANE_WEB.line, lane.handles[0]);
  channel.deliver(SYNC);
  assert.equal(fdsOf(inode), 0);
  channel.deliver(lanes(0));
  assert.equal(session.lanes.size, 0);
});

test('stop: the lanes close first, then accepted and drain-request; clients queued on a lane wait for the next process', LIMIT, async (t) => {
  const { channel, session, handles } = await serving(t);
  // Served; the dispatcher's copy; one sent after the stop.
  const [lane] = await receivedLanes(t, { copies: 3 });
  const inode = socketInode(lane.handles[0]);
  channel.deliver(LANE_WEB.line, lane.handles[0]);
  channel.deliver(lanes(1));
  const { client } = await connectThrough(t, handles[0], lane.port, '127.0.0.12');
  const before = channel.sent.length;
  channel.emit('SIGTERM', 'SIGTERM');
  assert.equal(session.state, 'stopping');
  assert.equal(fdsOf(inode), 2, "the dispatcher's copy and the one still to come");
  assert.deepEqual(channel.sent.slice(before), [acceptedLine(1), DRAIN_REQUEST]);
  assert.equal(handles[0].sockets.size, 1, 'its connections are served on');

  // A set that comes now is not served.
  channel.deliver(LANE_WEB.line, lane.handles[2]);
  channel.deliver(lanes(1));
  assert.equal(fdsOf(inode), 1);
  assert.equal(session.lanes.size, 0);

  // The kernel queues a new client on the socket (the dispatcher's copy listens on); the
  // worker's next process accepts it.
  const queued = await clientFrom(t, lane.port, '127.0.0.13');
  const next = new net.Server();
  t.after(() => next.close());
  next.listen(lane.handles[1], LANE_WEB.serve.backlog);
  const [socket] = await once(next, 'connection');
  assert.equal(socket.remotePort, queued.localPort);
  socket.destroy();
  client.destroy();
});

test('a drain that comes unasked closes the lanes: the dispatcher drains, or the channel closes', LIMIT, async (t) => {
  for (const end of ['drain', 'disconnect']) {
    const { channel, session } = await serving(t);
    const [lane] = await receivedLanes(t);
    const inode = socketInode(lane.handles[0]);
    channel.deliver(LANE_WEB.line, lane.handles[0]);
    channel.deliver(lanes(1));
    assert.equal(fdsOf(inode), 1);
    if (end === 'drain') channel.deliver(DRAIN);
    else channel.emit('disconnect');
    assert.equal(session.state, 'draining', end);
    assert.equal(fdsOf(inode), 0, end);
    await channel.exited;
  }
});

test('accepted: the running total, at most once per interval while it changes', LIMIT, async (t) => {
  const { channel, handles } = await serving(t);
  const [lane] = await receivedLanes(t);
  channel.deliver(LANE_WEB.line, lane.handles[0]);
  channel.deliver(lanes(1));
  const reports = [];
  channel.on('sent', (msg) => {
    if (msg.stickyDispatch === 'accepted') reports.push({ count: msg.count, at: Date.now() });
  });
  await connectThrough(t, handles[0], lane.port, '127.0.0.14');
  await channel.sentMessage((m) => m.stickyDispatch === 'accepted' && m.count === 1);
  for (const from of ['127.0.0.15', '127.0.0.16']) await connectThrough(t, handles[0], lane.port, from);
  await channel.sentMessage((m) => m.stickyDispatch === 'accepted' && m.count === 3);
  assert.deepEqual(reports.map((r) => r.count), [1, 3], 'one report for both');
  // Date.now() is in whole ms, and a timer may fire within its ms.
  assert.ok(reports[1].at - reports[0].at >= ACCEPTED_INTERVAL - 1, `${reports[1].at - reports[0].at} ms`);
});

test('over a real channel: an http app serves its lane, reports what it accepted, and closes it at SIGTERM before asking to drain', LIMIT, async (t) => {
  const bridge = new FakeBridge(path.join(__dirname, 'apps', 'http-app.js'));
  t.after(() => bridge.close());
  await bridge.message((m) => m.stickyDispatch === 'ready');
  const port = await bridge.lane('web', 1024);
  const res = await get(port, '/', { localAddress: '127.0.0.17' });
  assert.equal(res.status, 200);
  assert.equal(res.json.remoteAddress, '127.0.0.17');
  assert.deepEqual(res.json.info, {
    seq: null,
    peer: { address: '127.0.0.17', port: res.json.remotePort, family: 'IPv4' },
    local: { address: '127.0.0.1', port, family: 'IPv4' },
    listener: 'web',
  });
  await bridge.message((m) => m.stickyDispatch === 'accepted' && m.count === 1);
  bridge.child.kill('SIGTERM');
  await bridge.message((m) => m.stickyDispatch === 'drain-request');
  const ours = bridge.protocolMessages().slice(-2);
  assert.deepEqual(ours, [{ stickyDispatch: 'accepted', count: 1 }, { stickyDispatch: 'drain-request' }]);
  // The app held the only fd of the socket, and has closed it.
  const refused = net.connect(port, '127.0.0.1');
  const [err] = await once(refused, 'error');
  assert.equal(err.code, 'ECONNREFUSED');
  bridge.drain();
  assert.deepEqual(await bridge.exited, { code: 0, signal: null }, bridge.stderr);
});
