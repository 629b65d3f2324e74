'use strict';
// A WorkerSession's channel without a process behind it: what the session sends, as the
// lines Node would write, and what it asks of the process (exit, disconnect). The tests
// deliver messages and signals with emit(), as `process` would.
const { EventEmitter, once } = require('node:events');
const { fork } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');
const assert = require('node:assert/strict');
const { WorkerSession } = require('./internals');

class FakeChannel extends EventEmitter {
  constructor() {
    super();
    /** Every message sent, as Node's JSON serialization writes it: one line each. */
    this.sent = [];
    this.connected = true;
    this.disconnects = 0;
    this.exits = 0;
    /** Resolves when the session asks the process to exit. */
    this.exited = new Promise((resolve) => (this.onExit = resolve));
  }

  send(msg) {
    this.sent.push(JSON.stringify(msg) + '\n');
    this.emit('sent', msg);
  }

  /** Resolves with the first message sent from `this.sent[from]` on that `match` accepts. */
  sentMessage(match, from = 0) {
    const seen = this.sent.slice(from).map((l) => JSON.parse(l)).find(match);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve) => {
      const onSent = (msg) => {
        if (!match(msg)) return;
        this.removeListener('sent', onSent);
        resolve(msg);
      };
      this.on('sent', onSent);
    });
  }

  disconnect() {
    this.connected = false;
    this.disconnects += 1;
  }

  exit() {
    this.exits += 1;
    this.onExit();
  }

  /** One line from sticky-dispatch, as Node core delivers it (`socket`: the line's fd). */
  deliver(line, socket) {
    const msg = JSON.parse(line);
    // Node core keeps its own messages (a `cmd` starting with NODE_) and emits a handle's
    // `msg` with the socket it made of the fd.
    const internal = msg !== null && typeof msg === 'object' && typeof msg.cmd === 'string' && msg.cmd.startsWith('NODE_');
    if (!internal) this.emit('message', msg, undefined);
    else if (msg.cmd === 'NODE_HANDLE' && socket) this.emit('message', msg.msg, socket);
  }
}

/** A connected TCP pair on 127.0.0.1: `socket` the accepted end (what an fd would bring). */
async function tcpPair(t) {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const client = net.connect(server.address().port, '127.0.0.1');
  const [socket] = await once(server, 'connection');
  server.close();
  client.on('error', () => {});
  socket.on('error', () => {});
  t.after(() => {
    client.destroy();
    socket.destroy();
  });
  return { socket, client };
}

/**
 * A WorkerSession on a FakeChannel with one net.Server per listener (null: the one
 * without a listener), through StickyServer as listen() makes them. Waits for `ready`.
 */
async function serving(t, { listeners = [null], options = {} } = {}) {
  const { StickyServer } = require('./internals');
  const channel = new FakeChannel();
  const session = new WorkerSession(channel);
  const handles = listeners.map((listener) => {
    const handle = new StickyServer(net.createServer(), listener, 'bridge', session);
    session.add(handle, options);
    return handle;
  });
  t.after(() => clearTimeout(session.timer));
  await Promise.all(handles.map((h) => h.listening));
  return { channel, session, handles };
}

/**
 * Listening sockets on 127.0.0.1 as a lane reaches the package: raw TCP handles that Node
 * core made of `net.Native` lines over a real IPC channel (from helpers/lane-source.js,
 * which keeps no copy). `copies` handles per socket: the same socket received again, as
 * after a dispatcher restart. Returns [{port, handles}], one per socket.
 */
async function receivedLanes(t, { sockets = 1, copies = 1, backlog = 511 } = {}) {
  const source = fork(path.join(__dirname, 'lane-source.js'), [sockets, copies, backlog].map(String), {
    serialization: 'json',
  });
  const lanes = new Map();
  source.on('message', (msg, handle) => {
    if (!lanes.has(msg.port)) lanes.set(msg.port, { port: msg.port, handles: [] });
    lanes.get(msg.port).handles.push(handle);
  });
  // Once it has exited nothing but this process holds the sockets.
  const [code] = await once(source, 'exit');
  assert.equal(code, 0, 'lane-source exited');
  const received = [...lanes.values()];
  assert.equal(received.length, sockets);
  t.after(() => {
    // Closing a handle again does nothing: the package has closed some.
    for (const { handles } of received) for (const handle of handles) handle.close();
  });
  return received;
}

/** The socket's inode (`socket:[N]` in /proc/PID/fd) of a handle or a net.Socket's handle. */
function socketInode(handle) {
  return fs.fstatSync(handle.fd).ino;
}

/** How many of process `pid`'s fds refer to the socket with inode `inode`. */
function fdsOf(inode, pid = 'self') {
  const dir = `/proc/${pid}/fd`;
  let count = 0;
  for (const fd of fs.readdirSync(dir)) {
    try {
      if (fs.readlinkSync(`${dir}/${fd}`) === `socket:[${inode}]`) count += 1;
    } catch {
      // Closed since the listing (readdir's own fd, say).
    }
  }
  return count;
}

/** A client on 127.0.0.1:`port` from the local address `from` (any of 127.0.0.0/8). */
async function clientFrom(t, port, from) {
  const client = net.connect({ port, host: '127.0.0.1', localAddress: from });
  client.on('error', () => {});
  t.after(() => client.destroy());
  await once(client, 'connect');
  return client;
}

module.exports = { FakeChannel, tcpPair, serving, receivedLanes, socketInode, fdsOf, clientFrom };
