'use strict';
// Plays sticky-dispatch for the tests, over a real Node IPC channel: the bridge (it starts
// node and reads `ready`) and the dispatcher (it hands connections and sends `drain`).
//
// fork() gives the child exactly what the bridge gives node: NODE_CHANNEL_FD with JSON
// serialization. child.send(msg, socket) writes {"cmd":"NODE_HANDLE","type":"net.Socket",
// "msg":{...}} with the socket's fd attached (SCM_RIGHTS): the dispatcher's wire format
// (tests/vectors/node-ipc.json). Node's sender waits for each NODE_HANDLE_ACK before the
// next handle; the dispatcher keeps up to 256 in flight, which the package cannot tell
// apart. It sends no `sync`: the package's answer is tested in node-ipc.test.js.

const { fork } = require('node:child_process');
const net = require('node:net');
const { once } = require('node:events');
const { ENV_INDEX } = require('./internals');

class FakeBridge {
  /**
   * @param {string} app  the script to run
   * @param {{env?: object, args?: string[], index?: string|null}} options
   */
  constructor(app, { env = {}, args = [], index = '3' } = {}) {
    const childEnv = { ...process.env, ...env };
    if (index === null) delete childEnv[ENV_INDEX];
    else childEnv[ENV_INDEX] = index;
    this.child = fork(app, args, {
      serialization: 'json',
      env: childEnv,
      stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
    });
    this.stdout = '';
    this.stderr = '';
    this.child.stdout.setEncoding('utf8').on('data', (d) => (this.stdout += d));
    this.child.stderr.setEncoding('utf8').on('data', (d) => (this.stderr += d));
    this.messages = [];
    this.waiters = [];
    this.seq = 0;
    this.child.on('message', (msg) => {
      this.messages.push(msg);
      this.waiters = this.waiters.filter((w) => !(w.match(msg) && (w.resolve(msg), true)));
    });
    // A send on a closed channel: the test's assertions say what should have happened.
    this.sendErrors = [];
    this.child.on('error', (err) => this.sendErrors.push(err));
    this.exited = once(this.child, 'exit').then(([code, signal]) => ({ code, signal }));
    this.server = null;
  }

  /** Resolves with the first message (received already or later) that `match` accepts. */
  message(match) {
    const seen = this.messages.find(match);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      this.waiters.push({ match, resolve });
      this.exited.then(({ code, signal }) =>
        reject(new Error(`app exited (code ${code}, signal ${signal}) before the message; stderr:\n${this.stderr}`)),
      );
    });
  }

  /** The package's own messages, in order. */
  protocolMessages() {
    return this.messages.filter((m) => m && typeof m.stickyDispatch === 'string');
  }

  /**
   * Accepts TCP connections on 127.0.0.1 and hands each to the app with `describe(seq,
   * socket)` as its message fields (peer, local, listener).
   */
  async listen(describe = defaultDescription) {
    // pauseOnConnect: this process must not read the request before the app gets the fd.
    this.server = net.createServer({ pauseOnConnect: true }, (socket) => this.hand(socket, describe));
    this.server.listen(0, '127.0.0.1');
    await once(this.server, 'listening');
    return this.server.address().port;
  }

  hand(socket, describe = defaultDescription) {
    const seq = ++this.seq;
    const msg = { stickyDispatch: 'connection', seq, ...describe(seq, socket) };
    // A socket of a net.Server would make Node add a `key` and track it across both
    // processes; the dispatcher sends none.
    socket.server = null;
    this.child.send(msg, socket);
    return msg;
  }

  /**
   * Gives the app one lane, as the dispatcher does after a sync: a listening socket on
   * 127.0.0.1 (a `lane` line of type net.Native with its fd), then `lanes`. Keeps no copy
   * of the socket, so that nothing else accepts on it. Resolves with its port.
   */
  async lane(listener = 'web', backlog = 511) {
    const server = net.createServer();
    server.listen({ port: 0, host: '127.0.0.1', backlog });
    await once(server, 'listening');
    const port = server.address().port;
    const local = { address: '127.0.0.1', port, family: 'IPv4' };
    // A raw TCP handle: Node writes type net.Native, as the dispatcher does.
    await new Promise((resolve) => this.child.send({ stickyDispatch: 'lane', listener, backlog, local }, server._handle, resolve));
    // Written: the fd is in the channel, ours may close.
    server.close();
    this.child.send({ stickyDispatch: 'lanes', count: 1 });
    return port;
  }

  drain() {
    this.child.send({ stickyDispatch: 'drain' });
  }

  close() {
    if (this.server) this.server.close();
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
  }
}

/** A documentation address (198.51.100.0/24) as the client: never the socket's own. */
function defaultDescription(seq, socket) {
  return {
    peer: { address: `198.51.100.${seq % 250}`, port: 40000 + seq, family: 'IPv4' },
    local: { address: socket.localAddress, port: socket.localPort, family: 'IPv4' },
    listener: 'web',
  };
}

module.exports = { FakeBridge, defaultDescription };
