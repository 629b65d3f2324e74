'use strict';
// The package speaks exactly the lines of tests/vectors/node-ipc.json (which cargo test
// checks against src/node_ipc.rs): decoded on a fake channel, and over a real IPC channel
// through Node core, byte for byte.
const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { spawn } = require('node:child_process');
const { once } = require('node:events');
const { connectionInfo } = require('..');
const { ENV_INDEX } = require('./helpers/internals');
const { tcpPair, serving, receivedLanes, clientFrom } = require('./helpers/fake-channel');
const { readVectors } = require('./helpers/vectors');

const LIMIT = { timeout: 20000 };
const vectors = readVectors('node-ipc.json');
const toNode = Object.fromEntries(vectors.to_node.map((m) => [m.name, m]));
const fromNode = Object.fromEntries(vectors.from_node.map((m) => [m.name, m]));
const line = (messages, name, i = 0) => messages[name].examples[i].line;

test('node-ipc.json: every message, none missing, each line in Node\'s JSON serialization', () => {
  assert.deepEqual(Object.keys(toNode), ['connection', 'lane', 'lanes', 'sync', 'drain']);
  assert.deepEqual(Object.keys(fromNode), ['ready', 'synced', 'drain-request', 'accepted', 'ack', 'nack']);
  const written = [...vectors.to_node, ...vectors.from_node].flatMap((m) => m.examples.map((e) => e.line));
  written.push(toNode.connection.without_fd.answer, toNode.lane.without_fd.answer, ...vectors.to_node_ignored.examples.map((e) => e.line));
  for (const l of written) {
    // What Node writes, and so what helpers/fake-bridge.js's child.send() writes.
    assert.equal(JSON.stringify(JSON.parse(l)) + '\n', l, `one line as JSON.stringify writes it: ${l}`);
  }
});

test('to_node connection: the socket reaches the server with the vector\'s info and addresses', LIMIT, async (t) => {
  const examples = [...toNode.connection.examples, ...vectors.to_node_tolerated.examples];
  const { channel, handles } = await serving(t);
  const infos = [];
  handles[0].on('connection', (socket, info) => infos.push(info));
  for (const example of examples) {
    const { socket, client } = await tcpPair(t);
    // The socket's own peer, asked of the client: asking the socket would fix its answer.
    const own = { address: client.localAddress, port: client.localPort };
    channel.deliver(example.line, socket);
    assert.deepEqual(infos.at(-1), example.info, example.line);
    assert.equal(connectionInfo(socket), infos.at(-1));
    const peer = example.info.peer ?? { ...own, family: 'IPv4' };
    assert.deepEqual(
      { address: socket.remoteAddress, port: socket.remotePort, family: socket.remoteFamily },
      peer,
      `the socket reports the vector's peer (or its own): ${example.line}`,
    );
    if (example.info.local) assert.equal(socket.localAddress, example.info.local.address);
  }
  assert.equal(infos.length, examples.length);
  assert.deepEqual(channel.sent, [line(fromNode, 'ready')], 'Node core answers handles, not the package');
});

test('to_node sync: answered with the vector\'s synced line in serving, stopping and draining', LIMIT, async (t) => {
  const { line: sync, answer } = toNode.sync.examples[0];
  const { channel, session } = await serving(t);
  const answers = {};
  channel.deliver(sync);
  answers[session.state] = channel.sent.at(-1);
  channel.emit('SIGTERM', 'SIGTERM');
  channel.deliver(sync);
  answers[session.state] = channel.sent.at(-1);
  // Held open so that the session stays in draining.
  const { socket } = await tcpPair(t);
  channel.deliver(line(toNode, 'connection'), socket);
  channel.deliver(line(toNode, 'drain'));
  channel.deliver(sync);
  answers[session.state] = channel.sent.at(-1);
  assert.deepEqual(answers, answer);
});

test('to_node drain: drains with the vector\'s reason', LIMIT, async (t) => {
  const { channel, session, handles } = await serving(t);
  const drained = once(handles[0], 'drain');
  channel.deliver(line(toNode, 'drain'));
  assert.deepEqual(await drained, [toNode.drain.examples[0].reason]);
  await channel.exited;
  assert.equal(session.state, 'closed');
});

test('from_node: ready, synced and drain-request are the vector\'s lines, in a session\'s order', LIMIT, async (t) => {
  const { channel, handles } = await serving(t);
  channel.deliver(line(toNode, 'sync'));
  handles[0].close();
  channel.deliver(line(toNode, 'sync'));
  const synced = fromNode.synced.examples;
  assert.deepEqual(
    synced.map((e) => [e.answers, e.state]),
    [['sync', 'serving'], ['sync', 'stopping']],
  );
  assert.deepEqual(channel.sent, [line(fromNode, 'ready'), synced[0].line, line(fromNode, 'drain-request'), synced[1].line]);
});

/**
 * A session serving the vector's lanes, in order, then their `lanes` line; `listeners`
 * as for serving(). Returns serving()'s result, the lanes received, the backlogs listened with.
 */
async function servingLanes(t, listeners) {
  const examples = toNode.lane.examples;
  const served = await serving(t, { listeners });
  const received = await receivedLanes(t, { sockets: examples.length });
  const backlogs = [];
  examples.forEach((example, i) => {
    const [handle] = received[i].handles;
    const own = handle.listen;
    handle.listen = (backlog) => (backlogs.push(backlog), own.call(handle, backlog));
    served.channel.deliver(example.line, handle);
  });
  served.channel.deliver(line(toNode, 'lanes'));
  return { ...served, received, backlogs };
}

test('to_node lane and lanes: each lane is served with the vector\'s backlog, for its listener', LIMIT, async (t) => {
  const examples = toNode.lane.examples;
  assert.equal(toNode.lanes.examples[0].encode.count, examples.length, 'the lanes example closes the lane examples');
  const { channel, session, handles, received, backlogs } = await servingLanes(t, examples.map((e) => e.serve.listener));
  assert.deepEqual(backlogs, examples.map((e) => e.serve.backlog));
  assert.equal(session.lanes.size, examples.length);
  for (const [i, example] of examples.entries()) {
    const got = once(handles[i], 'connection');
    await clientFrom(t, received[i].port, '127.0.0.1');
    const [, info] = await got;
    assert.equal(info.listener, example.serve.listener);
  }
  channel.deliver(line(toNode, 'lanes', 1));
  assert.equal(session.lanes.size, 0, 'count 0: no lanes');
});

test('from_node accepted: the vector\'s line, sent at the stop before drain-request', LIMIT, async (t) => {
  const { count } = fromNode.accepted.examples[0].classify;
  const { channel, handles, received } = await servingLanes(t, [null]);
  for (let i = 0; i < count; i++) {
    const got = once(handles[0], 'connection');
    await clientFrom(t, received[i % received.length].port, '127.0.0.1');
    await got;
  }
  channel.emit('SIGTERM', 'SIGTERM');
  assert.deepEqual(channel.sent.slice(-2), [line(fromNode, 'accepted'), line(fromNode, 'drain-request')]);
});

test('to_node_ignored: no answer, no change of state, no connection', LIMIT, async (t) => {
  const { channel, session, handles } = await serving(t);
  handles[0].on('connection', () => assert.fail('no connection'));
  for (const { line: l, why } of vectors.to_node_ignored.examples) {
    channel.deliver(l, undefined);
    assert.equal(session.state, 'serving', why);
  }
  assert.deepEqual(channel.sent, [line(fromNode, 'ready')]);
});

/** The lines a child writes on its raw IPC channel, waited for one by one. */
class Lines {
  constructor(stream, exited) {
    this.lines = [];
    this.next = 0;
    this.waiting = null;
    // Rejects when the child exits: a line still awaited then will not come.
    this.gone = exited.then(({ code, signal }) => {
      throw new Error(`the app exited (code ${code}, signal ${signal}) before its next line; lines: ${this.lines}`);
    });
    this.gone.catch(() => {});
    let rest = '';
    stream.setEncoding('utf8');
    stream.on('data', (data) => {
      const parts = (rest + data).split('\n');
      rest = parts.pop();
      this.lines.push(...parts.map((p) => p + '\n'));
      if (this.waiting) this.waiting();
    });
  }

  /** The next line of the dialect (a `stickyDispatch` or `cmd` one), skipping the app's own. */
  async protocol() {
    for (;;) {
      while (this.next < this.lines.length) {
        const l = this.lines[this.next++];
        const msg = JSON.parse(l);
        if (msg && (typeof msg.stickyDispatch === 'string' || typeof msg.cmd === 'string')) return l;
      }
      const arrived = new Promise((resolve) => (this.waiting = resolve));
      await Promise.race([arrived, this.gone]);
    }
  }
}

test('over a real channel: Node core and the package read and write exactly the vector\'s lines', LIMIT, async (t) => {
  // The channel as the bridge makes it, but a stream pair whose bytes the test sees: no fd
  // can go this way, so a connection line comes without one and Node core answers NACK.
  const child = spawn(process.execPath, [path.join(__dirname, 'apps', 'http-app.js')], {
    env: { ...process.env, NODE_CHANNEL_FD: '3', NODE_CHANNEL_SERIALIZATION_MODE: 'json', [ENV_INDEX]: '3' },
    stdio: ['ignore', 'ignore', 'pipe', 'pipe'],
  });
  t.after(() => child.kill('SIGKILL'));
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (d) => (stderr += d));
  const exited = once(child, 'exit').then(([code, signal]) => ({ code, signal }));
  const channel = child.stdio[3];
  const closed = once(channel, 'close');
  const lines = new Lines(channel, exited);
  const { line: sync, answer } = toNode.sync.examples[0];

  assert.equal(await lines.protocol(), line(fromNode, 'ready'));
  channel.write(sync);
  assert.equal(await lines.protocol(), answer.serving);
  channel.write(line(toNode, 'connection'));
  assert.equal(await lines.protocol(), toNode.connection.without_fd.answer);
  channel.write(line(toNode, 'lane'));
  assert.equal(await lines.protocol(), toNode.lane.without_fd.answer);
  channel.write(line(toNode, 'lanes', 1));
  // Nothing answers the ignored lines: the next line is the answer to the sync after them.
  for (const { line: l } of vectors.to_node_ignored.examples) channel.write(l);
  channel.write(sync);
  assert.equal(await lines.protocol(), answer.serving);
  child.kill('SIGTERM');
  assert.equal(await lines.protocol(), line(fromNode, 'drain-request'));
  channel.write(sync);
  assert.equal(await lines.protocol(), answer.stopping);
  channel.write(line(toNode, 'drain'));
  assert.deepEqual(await exited, { code: 0, signal: null }, stderr);
  await closed;
  const drains = lines.lines.map((l) => JSON.parse(l)).filter((m) => m && m.app === 'drain');
  assert.deepEqual(drains, [{ app: 'drain', reason: toNode.drain.examples[0].reason }]);
});
