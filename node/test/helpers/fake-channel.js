'use strict';
// A WorkerSession's channel without a process behind it: what the session sends, as the
// lines Node would write, and what it asks of the process (exit, disconnect). The tests
// deliver messages and signals with emit(), as `process` would.
const { EventEmitter, once } = require('node:events');
const net = require('node:net');
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

module.exports = { FakeChannel, tcpPair, serving };
