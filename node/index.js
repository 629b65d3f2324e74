'use strict';
// sticky-dispatch for Node.js: serve the connections that the dispatcher hands to this
// process over Node's own IPC channel.
//
//   const sticky = require('sticky-dispatch');
//   sticky.listen(httpServer);            // instead of httpServer.listen(port)
//
// The bridge (`sticky-dispatch node-worker -- node app.js`) starts node with
// NODE_CHANNEL_FD (JSON serialization) and, once the app is ready, passes the other end of
// that channel to the dispatcher, which then writes to this process directly. Per client
// connection it sends one line with one fd (SCM_RIGHTS); Node core turns it into
//   process.on('message', (msg, socket))
// with msg = {stickyDispatch: 'connection', seq, peer, local, listener} and socket a
// connected net.Socket. Other messages carry no fd ("sticky-dispatch" is the bridge until
// the app is ready, then the dispatcher):
//   node -> sticky-dispatch  {stickyDispatch: 'ready'}          sent when the app calls listen()
//   sticky-dispatch -> node  {stickyDispatch: 'sync', id}       a dispatcher takes the channel
//   node -> sticky-dispatch  {stickyDispatch: 'synced', id, draining, lanes: true}
//   node -> sticky-dispatch  {stickyDispatch: 'drain-request'}  this process was asked to stop
//   sticky-dispatch -> node  {stickyDispatch: 'drain'}          no more connections will come
// Lanes (routing by client IP in the kernel): after the sync the dispatcher may send this
// worker's listening sockets, one line each with the socket's fd (a net.Native handle:
// Node passes the raw TCP handle), then the count of them; the package accepts on them
// itself and reports how many it accepted:
//   sticky-dispatch -> node  {stickyDispatch: 'lane', listener, backlog, local} + fd
//   sticky-dispatch -> node  {stickyDispatch: 'lanes', count}
//   node -> sticky-dispatch  {stickyDispatch: 'accepted', count}
// The full protocol is in docs/node.md; every line of it, byte for byte, in
// tests/vectors/node-ipc.json (node/test/node-ipc.test.js checks this file against it).

const fs = require('node:fs');
const net = require('node:net');
const { EventEmitter } = require('node:events');

// --- Facts shared with the dispatcher -------------------------------------------------------
// Defined here once. tests/vectors/constants.json publishes the dispatcher's values and
// node/test/constants.test.js checks these against it (the package does not read it).

/** The environment variable in which the bridge gives this worker its index. */
const ENV_INDEX = 'STICKY_DISPATCH_INDEX';

/** drainTimeout's default (ms): the bound on requests in progress at a stop. */
const DEFAULT_DRAIN_TIMEOUT = 30000;

/** The shortest time (ms) between two `accepted` reports. */
const ACCEPTED_INTERVAL = 1000;

const HOW_TO_START = [
  'Start it through the bridge, which hands it the connections:',
  '  sticky-dispatch node-worker -- node app.js',
  'under systemd (ExecStart= of the worker unit, see docs/node.md), or in standalone mode:',
  '  sticky-dispatch --listen 127.0.0.1:8080 --workers 4 -- sticky-dispatch node-worker -- node app.js',
  '(sticky-dispatch is the binary of the .deb or .rpm, or of `cargo install --path .` or',
  '`cargo build --release` (target/release/sticky-dispatch) in its repository: see docs/node.md.)',
  'To serve without sticky-dispatch (development), pass listen(server, { fallbackPort: 8080 }).',
].join('\n');

/** Thrown by listen() when the process was not started by the bridge and has no fallback. */
class NoBridgeError extends Error {
  constructor(why) {
    super(`sticky-dispatch: ${why}.\n${HOW_TO_START}`);
    this.name = 'NoBridgeError';
    this.code = 'ERR_STICKY_DISPATCH_NO_BRIDGE';
  }
}

function parseIndex(value) {
  return typeof value === 'string' && /^[0-9]+$/.test(value) ? Number(value) : null;
}

/** This worker's index (STICKY_DISPATCH_INDEX, set by the bridge), or null. */
const index = parseIndex(process.env[ENV_INDEX]);

function workerIndex() {
  return index;
}

/** Why this process cannot take connections from sticky-dispatch, or null if it can. */
function bridgeProblem() {
  if (typeof process.send !== 'function' || !process.connected) {
    return 'this process has no IPC channel: it was not started by `sticky-dispatch node-worker`';
  }
  // A worker of Node's own cluster module has an IPC channel too, to its cluster master.
  if (process.env.NODE_UNIQUE_ID !== undefined) {
    return "this process is a worker of Node's cluster module, not of sticky-dispatch";
  }
  // The bridge always sets STICKY_DISPATCH_INDEX; another parent (a test runner, a
  // process manager) that forked us would never send a connection, and we would hang.
  if (index === null) {
    return `this process has an IPC channel, but not from sticky-dispatch (${ENV_INDEX} is not set)`;
  }
  return null;
}

// --- Addresses --------------------------------------------------------------------------

/** {address, port, family} from a connection message, checked; null if unusable. */
function checkedAddress(value) {
  if (!value || typeof value !== 'object') return null;
  const { address, port } = value;
  const version = typeof address === 'string' ? net.isIP(address) : 0;
  if (version === 0 || !Number.isInteger(port) || port < 0 || port > 65535) return null;
  // Derived from the address, so that family and address can never disagree.
  return Object.freeze({ address, port, family: version === 6 ? 'IPv6' : 'IPv4' });
}

/**
 * The info of a connection the kernel routed to a lane: the socket's own addresses are the
 * client's and the one it reached, read when first asked (getpeername and getsockname at
 * every accept were a third of this path's cost per connection, and most apps never ask).
 * A plain frozen object like the dispatcher's connections' info, its addresses getters.
 */
function laneConnectionInfo(socket, listener) {
  let peer;
  let local;
  return Object.freeze({
    seq: null,
    get peer() {
      if (peer === undefined) peer = checkedAddress({ address: socket.remoteAddress, port: socket.remotePort });
      return peer;
    },
    get local() {
      if (local === undefined) local = checkedAddress({ address: socket.localAddress, port: socket.localPort });
      return local;
    },
    listener,
  });
}

/** A getpeername/getsockname replacement reporting `addr`, with the handle's calling convention. */
function reporting(addr) {
  return function getname(out) {
    out.address = addr.address;
    out.port = addr.port;
    out.family = addr.family;
    return 0;
  };
}

/**
 * Makes the socket report the addresses the dispatcher gave: the real client (under PROXY
 * protocol routing it is not the socket's own peer) and the local address it reached.
 *
 * The override sits on the socket's TCP handle, not on the net.Socket: net.Socket asks
 * the handle (and caches the answer in _peername), and a TLSSocket that wraps this
 * socket (tls.Server, https, http2) proxies getpeername/getsockname to the same TCP
 * handle, so req.socket.remoteAddress is the client in every one of them.
 */
function presentAddresses(socket, peer, local) {
  const handle = socket._handle;
  if (!handle) return;
  if (peer) handle.getpeername = reporting(peer);
  if (local) handle.getsockname = reporting(local);
}

// Connection details on their socket, for connectionInfo(): a symbol-keyed property, not
// a WeakMap, whose entries cost the garbage collector at every connection (measured on
// the lanes' path, where nothing else is done per connection).
const kInfo = Symbol('stickyDispatchInfo');

/**
 * What the dispatcher said about the connection of `socket` ({seq, peer, local, listener}),
 * or undefined for a socket that did not come from it. Accepts the TLSSocket that
 * tls.Server/https made of a connection too.
 */
function connectionInfo(socket) {
  if (!socket || typeof socket !== 'object') return undefined;
  return socket[kInfo] ?? socket._parent?.[kInfo];
}

// --- The per-server handle --------------------------------------------------------------

/**
 * What listen() returns, one per server. Events: 'connection' (socket, info), 'drain'
 * (the process stops taking connections; finish or close long-lived ones: socket.io's
 * are closed by announceClose), 'close' (every connection of the server is closed, or
 * was cut at the drain timeout).
 */
class StickyServer extends EventEmitter {
  constructor(server, listener, mode, session = null) {
    super();
    this.server = server;
    /** The dispatcher listener whose connections this server takes; null for all. */
    this.listener = listener;
    /** 'bridge', or 'fallback' when it listens on its own (not sticky). */
    this.mode = mode;
    /** The process's WorkerSession in 'bridge' mode; null in 'fallback' mode. */
    this._session = session;
    this.draining = false;
    this.sockets = new Set(); // connections handed to the server, until they close
    this.responses = new Set(); // HTTP responses in progress
    this.served = new Set(); // HTTP/1 connections that have had a request, until they close
    let resolveListening;
    let resolveClosed;
    /** Resolves once the server is serving (ready was sent, or it listens in fallback mode). */
    this.listening = new Promise((resolve) => (resolveListening = resolve));
    /** Resolves once the drain has finished (just before the process exits). */
    this.closed = new Promise((resolve) => (resolveClosed = resolve));
    this._resolveListening = resolveListening;
    this._resolveClosed = resolveClosed;
  }

  /**
   * Stops this process as if it had received SIGTERM: asks the dispatcher to drain, which
   * then sends 'drain'. Resolves when the drain has finished. In fallback mode, closes
   * this server and resolves when its connections are closed.
   */
  close() {
    if (this.mode === 'fallback') {
      if (!this.draining) {
        this.draining = true;
        this.emit('drain');
        endResponses(this);
        closeServer(this.server, () => finishServer(this));
        closeIdle(this);
      }
    } else {
      this._session.stop('close');
    }
    return this.closed;
  }
}

// --- HTTP details of the drain ----------------------------------------------------------

function trackResponses(sticky) {
  // First among the 'request' listeners: the app's handler may answer at once, and a
  // request that comes during the drain must get `Connection: close` before that.
  sticky.server.prependListener('request', (req, res) => {
    const socket = req.socket;
    // HTTP/1 connections only (an http2 request's socket is its whole session's).
    if (socket && req.httpVersionMajor < 2 && !sticky.served.has(socket)) {
      sticky.served.add(socket);
      socket.once('close', () => sticky.served.delete(socket));
    }
    if (sticky.draining) {
      closeAfter(res);
      return;
    }
    sticky.responses.add(res);
    res.once('close', () => sticky.responses.delete(res));
  });
}

/** Makes `res` the last response of its connection. */
function closeAfter(res) {
  // Already written: Node detaches its connection once flushed; closeIdle() closes it.
  if (res.writableFinished) return;
  if (!res.headersSent) {
    // Node then ends the connection after this response (and says so to the client).
    res.setHeader('Connection', 'close');
    return;
  }
  // Headers already went out with keep-alive: end the connection once the response has
  // been written (end, not destroy, so its tail still reaches the client).
  const socket = res.socket;
  if (socket) res.once('finish', () => socket.end());
}

function endResponses(sticky) {
  for (const res of sticky.responses) closeAfter(res);
  sticky.responses.clear();
}

/**
 * Closes the server without letting Node close any connection: Node's http close()
 * (>= 19) also calls closeIdleConnections(), which, in the Node releases with
 * nodejs/node#63470, destroys a connection that has not sent its request yet. Here every
 * connection was handed over by the dispatcher once it had accepted it: its request is
 * on its way and must be served. closeIdle() closes the idle ones instead.
 */
function closeServer(server, callback) {
  const own = Object.getOwnPropertyDescriptor(server, 'closeIdleConnections');
  server.closeIdleConnections = () => {};
  try {
    server.close(callback);
  } finally {
    if (own) Object.defineProperty(server, 'closeIdleConnections', own);
    else delete server.closeIdleConnections;
  }
}

/**
 * Closes the keep-alive connections that have served at least one request and now wait
 * for the next: no response in progress or still being written (those end after it, see
 * closeAfter), and, where Node says so, no next request arriving. A connection that has
 * not sent its first request yet is left to send it; it is answered with
 * `Connection: close`, or cut at the drain timeout.
 */
function closeIdle(sticky) {
  const between = socketsBetweenRequests(sticky.server);
  for (const socket of sticky.served) {
    if (socket._httpMessage) continue;
    if (between && !between.has(socket)) continue;
    socket.destroy();
  }
}

/** The sockets whose HTTP parser is between two requests (Node's own idle list), or null. */
function socketsBetweenRequests(server) {
  const key = Object.getOwnPropertySymbols(server).find((s) => s.description === 'http.server.connections');
  const list = key === undefined ? undefined : server[key];
  if (!list || typeof list.idle !== 'function') return null;
  return new Set(list.idle().map((parser) => parser.socket));
}

/**
 * Emits the server's 'close' at the drain, not after its last connection as net.Server
 * would: the server takes no more connections, and what is attached to it stops now.
 * engine.io (socket.io) listens to it and closes every session: a websocket gets a close
 * frame, a long-poll in progress is answered with engine.io's `close` packet, and the
 * clients reconnect, through the dispatcher, to the next process. Left open, these
 * sessions keep their connections busy until the drain timeout (a long-poll is answered
 * every 25 s, a websocket never ends), and the worker's new process cannot start until
 * this one exits. Ordinary requests in progress are not affected. Once only: with no
 * connection open, net's own close() (closeServer) emits it on the next tick.
 */
function announceClose(sticky) {
  const server = sticky.server;
  if (server._connections > 0) server.emit('close');
}

function finishServer(sticky) {
  if (sticky.finished) return;
  sticky.finished = true;
  sticky.emit('close');
  sticky._resolveClosed();
}

// --- Lanes ------------------------------------------------------------------------------
// For routing by client IP the kernel does the dispatcher's work: each listener has one
// listening socket per worker (a lane) in a SO_REUSEPORT group, and a program attached to
// the group picks the lane from the client's address. The dispatcher gives this worker
// its lanes; the package accepts on them with a net.Server per lane and hands the
// connections to the app's server as it hands the dispatcher's.

/** Whether `handle` is what Node core makes of a net.Native line: a raw TCP handle. */
function isTcpHandle(handle) {
  return (
    handle !== null &&
    typeof handle === 'object' &&
    !(handle instanceof net.Socket) &&
    typeof handle.listen === 'function' &&
    typeof handle.close === 'function'
  );
}

/**
 * The socket a lane's handle refers to: a socket received twice (two fds, after a
 * dispatcher restart) has the same device and inode. Null if fstat cannot tell.
 */
function socketIdentity(handle) {
  try {
    const stat = fs.fstatSync(handle.fd, { bigint: true });
    return `${stat.dev}:${stat.ino}`;
  } catch {
    return null;
  }
}

/** The backlog to listen() with: the lane's own (the queue is shared by every holder). */
function laneBacklog(value) {
  // Without one Node would use 511; the dispatcher always sends one.
  return Number.isInteger(value) && value > 0 ? Math.min(value, 2 ** 31 - 1) : undefined;
}

/**
 * One lane served: a net.Server of its own on the lane's socket, whose connections go to
 * the app's server for the lane's listener. Closing it closes this process's fd of the
 * socket (never a shutdown, which would end the socket for every holder): the dispatcher
 * keeps a copy, and clients the kernel queues on it wait for this worker's next process.
 */
class Lane {
  constructor(session, msg, handle, identity) {
    this.listener = typeof msg.listener === 'string' ? msg.listener : null;
    this.identity = identity;
    const sticky = session.serverFor(this.listener);
    // A server that takes its connections paused gets them before a byte is read.
    this.server = new net.Server({ pauseOnConnect: Boolean(sticky && sticky.server.pauseOnConnect) });
    this.server.on('connection', (socket) => session.laneConnection(this, socket));
    this.server.on('error', (err) => {
      warnOnce(`lane-${this.listener}`, `cannot serve the lane of listener "${this.listener}": ${err.message}`);
    });
    // listen() on a listening socket sets its queue's length, for every holder: keep the
    // lane's own (Node's default is 511; listen({fd}) would use it too).
    this.server.listen(handle, laneBacklog(msg.backlog));
  }

  close() {
    this.server.close();
  }
}

// --- This process as a worker of the dispatcher ------------------------------------------

/**
 * Node's IPC channel to sticky-dispatch, as a WorkerSession uses it: messages, 'disconnect'
 * and the stop signals all come through `process`. The tests pass a fake one.
 */
const processChannel = {
  /** Sends one message (Node writes JSON.stringify(msg) + '\n'); a closed channel is not
   * an error here ('disconnect' handles it). */
  send(msg) {
    if (!process.connected) return;
    process.send(msg, (err) => {
      if (err && process.connected) warnOnce(`send-${msg.stickyDispatch}`, `could not send to sticky-dispatch: ${err.message}`);
    });
  },
  get connected() {
    return process.connected;
  },
  on(event, listener) {
    process.on(event, listener);
  },
  removeListener(event, listener) {
    process.removeListener(event, listener);
  },
  disconnect() {
    process.disconnect();
  },
  exit() {
    process.exit();
  },
};

/**
 * This process as one worker of the dispatcher: the servers given to listen() and where
 * the process is in its life, one state at a time. It speaks Node's IPC channel with
 * sticky-dispatch: the bridge until `ready`, then the dispatcher (each new one `sync`s
 * first). The messages are in docs/node.md and tests/vectors/node-ipc.json.
 *
 *   idle ──listen()──▶ serving ──stop()──▶ stopping ──drain()──▶ draining ──finish()──▶ closed
 *                         ╰──────────────────drain()───────────────▲
 *
 * - idle: no listen() yet; nothing listens on the channel.
 * - serving: takes connections. `ready` goes out once, after the tick of the first
 *   listen() (the servers given in that tick are all in place by then).
 * - stopping: asked to stop (SIGTERM, SIGINT, close()): the lanes closed, then
 *   `accepted` and `drain-request` sent. Still takes the dispatcher's connections (it may
 *   have some in flight for us) until `drain` comes; at the deadline (drainTimeout after
 *   the stop) it drains anyway.
 * - draining: no more connections will come (`drain`, the channel closed, or the
 *   deadline): the servers are closed and finish what they have until the deadline,
 *   then whatever is still open is cut. A connection that still arrives is closed.
 * - closed: every server has finished: the channel's listeners are removed and the
 *   process exits (exit: false: lets go of the channel and the app exits by itself).
 *
 * A `sync` is answered with `synced` in serving (`draining: false`), stopping and
 * draining (`draining: true`: a drain asked of the previous dispatcher is asked again).
 *
 * Lanes: in serving, each `lanes` makes the lanes received since the sync the ones served
 * (a socket already served keeps its server; one not in the set is closed). A new sync
 * alone changes nothing: the kernel routes to the lanes whether a dispatcher is there or
 * not. Their running count of connections goes out as `accepted`, at most once per
 * ACCEPTED_INTERVAL, and at the stop.
 */
class WorkerSession {
  constructor(channel = processChannel) {
    this.channel = channel;
    /** 'idle', 'serving', 'stopping', 'draining' or 'closed' (above). */
    this.state = 'idle';
    /** The StickyServers of the listen() calls, in order. */
    this.servers = [];
    // Process-wide settings from the listen() calls: the longest drain asked for; exit
    // unless a caller said otherwise.
    this.drainTimeout = null;
    this.exit = true;
    this.readySent = false;
    // From stopping on: when the drain must be over (ms, Date.now()), from the first stop.
    this.deadline = null;
    // stopping: the deadline's drain; draining: the deadline's cut.
    this.timer = null;
    // stopping: why it was asked to stop (a signal's name, 'close'); from draining on: the
    // drain's reason, as 'drain' was emitted with.
    this.reason = null;
    /** The lanes served, by socket identity (a Symbol for a socket fstat cannot tell). */
    this.lanes = new Map();
    /** Lanes received since the sync, until `lanes`: [{msg, handle}]. */
    this.offered = [];
    // Connections accepted on the lanes; the last count sent, and when; the report's timer.
    this.accepted = 0;
    this.acceptedSent = 0;
    this.acceptedAt = 0;
    this.acceptedTimer = null;
    this.onMessage = (msg, handle) => this.message(msg, handle);
    this.onDisconnect = () => this.drain('disconnect');
    this.onSignal = (signal) => this.stop(signal);
  }

  /** listen(): idle or serving → serving. */
  add(sticky, options) {
    if (this.state !== 'idle' && this.state !== 'serving') {
      throw new Error('sticky-dispatch: listen() called after this process began to stop');
    }
    if (this.servers.some((s) => s.listener === sticky.listener)) {
      throw new Error(
        sticky.listener === null
          ? 'sticky-dispatch: listen() without `listener` was already called: name the listener of each server'
          : `sticky-dispatch: a server for listener "${sticky.listener}" was already given`,
      );
    }
    this.servers.push(sticky);
    if (options.drainTimeout !== undefined || this.drainTimeout === null) {
      this.drainTimeout = Math.max(this.drainTimeout ?? 0, options.drainTimeout ?? DEFAULT_DRAIN_TIMEOUT);
    }
    if (options.exit === false) this.exit = false;
    trackResponses(sticky);
    if (this.state === 'idle') this.serve();
    // Servers given in the same tick (say http and https) are all in place before the
    // single ready message; one given later only gets 'listening'.
    process.nextTick(() => {
      sticky.server.emit('listening');
      this.sendReady();
      sticky._resolveListening();
    });
  }

  /** idle → serving: listen on the channel. */
  serve() {
    this.state = 'serving';
    // A 'message' listener also keeps the IPC channel referenced, which keeps this
    // process alive: the servers have no listening socket of their own.
    this.channel.on('message', this.onMessage);
    this.channel.on('disconnect', this.onDisconnect);
    // Under systemd (KillMode=control-group) node gets SIGTERM together with the bridge,
    // which passes on its own SIGTERM or SIGINT too: do not exit yet, the dispatcher may
    // have connections in flight for us. It answers the drain request with 'drain'.
    this.channel.on('SIGTERM', this.onSignal);
    this.channel.on('SIGINT', this.onSignal);
  }

  sendReady() {
    if (this.readySent) return;
    this.readySent = true;
    this.channel.send({ stickyDispatch: 'ready' });
  }

  /**
   * One message from the channel (Node core has already answered a handle's line):
   * `handle` is a connection's net.Socket, or a lane's raw TCP handle.
   */
  message(msg, handle) {
    // The app may use the IPC channel too; ours are marked with `stickyDispatch`.
    if (!msg || typeof msg !== 'object' || typeof msg.stickyDispatch !== 'string') return;
    if (msg.stickyDispatch === 'connection') {
      if (handle instanceof net.Socket) this.connection(msg, handle);
    } else if (msg.stickyDispatch === 'lane') {
      if (isTcpHandle(handle)) this.laneOffered(msg, handle);
    } else if (msg.stickyDispatch === 'lanes') {
      this.lanesComplete(msg.count);
    } else if (msg.stickyDispatch === 'drain') {
      // 'bridge': sticky-dispatch's side, as the declarations name it.
      this.drain('bridge');
    } else if (msg.stickyDispatch === 'sync') {
      // A dispatcher took the channel (the first, or the next after a restart): it reads
      // nothing before this answer, and sends its own set of lanes after it. A drain asked
      // of its predecessor is asked again here.
      this.dropOffered();
      this.channel.send({ stickyDispatch: 'synced', id: msg.id, draining: this.state !== 'serving', lanes: true });
    }
    // Anything else is from a newer sticky-dispatch: ignored.
  }

  /** The server for a dispatcher listener's connections, or undefined. */
  serverFor(listener) {
    return (
      this.servers.find((s) => s.listener !== null && s.listener === listener) ??
      this.servers.find((s) => s.listener === null)
    );
  }

  /** A connection for one of the servers; closed once draining. */
  connection(msg, socket) {
    if (this.state === 'draining' || this.state === 'closed') {
      warnOnce('connection-after-drain', 'a connection arrived after the drain began: closed');
      socket.destroy();
      return;
    }
    const listener = typeof msg.listener === 'string' ? msg.listener : null;
    const sticky = this.serverFor(listener);
    if (!sticky) {
      noServer(listener, socket);
      return;
    }
    const peer = checkedAddress(msg.peer);
    const local = checkedAddress(msg.local);
    presentAddresses(socket, peer, local);
    const info = Object.freeze({ seq: msg.seq, peer, local, listener });
    socket[kInfo] = info;
    handToServer(sticky, socket, info);
  }

  /** A lane's handle: held until its set is complete (`lanes`); closed once stopping. */
  laneOffered(msg, handle) {
    if (this.state !== 'serving') {
      handle.close();
      return;
    }
    this.offered.push({ msg, handle });
  }

  /** Closes the lanes received since the sync without their `lanes`. */
  dropOffered() {
    for (const { handle } of this.offered.splice(0)) handle.close();
  }

  /**
   * `lanes`: the lanes received since the sync are this worker's. A socket already served
   * stays with its server (the new fd, a duplicate, is closed); a lane served that is not
   * in the set is closed.
   */
  lanesComplete(count) {
    const offered = this.offered.splice(0);
    if (this.state !== 'serving') {
      for (const { handle } of offered) handle.close();
      return;
    }
    if (count !== offered.length) {
      warnOnce('lanes-count', `sticky-dispatch announced ${count} lanes, ${offered.length} arrived: serving those`);
    }
    const next = new Map();
    for (const { msg, handle } of offered) {
      const identity = socketIdentity(handle);
      const served = identity === null ? undefined : (next.get(identity) ?? this.lanes.get(identity));
      if (served) {
        handle.close();
        next.set(identity, served);
      } else {
        next.set(identity ?? Symbol('lane'), new Lane(this, msg, handle, identity));
      }
    }
    for (const [identity, lane] of this.lanes) {
      if (!next.has(identity)) lane.close();
    }
    this.lanes = next;
  }

  /** Stops serving the lanes, and drops any received since the sync. */
  closeLanes() {
    for (const lane of this.lanes.values()) lane.close();
    this.lanes.clear();
    this.dropOffered();
  }

  /** A connection accepted on a lane: counted, and handed to the server for its listener. */
  laneConnection(lane, socket) {
    this.accepted += 1;
    this.reportAccepted();
    const sticky = this.serverFor(lane.listener);
    if (!sticky) {
      noServer(lane.listener, socket);
      return;
    }
    const info = laneConnectionInfo(socket, lane.listener);
    socket[kInfo] = info;
    handToServer(sticky, socket, info);
  }

  /** Sends the lanes' count within ACCEPTED_INTERVAL of the last report, once per interval. */
  reportAccepted() {
    if (this.acceptedTimer !== null) return;
    const wait = Math.max(0, this.acceptedAt + ACCEPTED_INTERVAL - Date.now());
    this.acceptedTimer = setTimeout(() => this.sendAccepted(false), wait);
  }

  /** Sends the lanes' count if it changed since the last report (`always`: if not 0). */
  sendAccepted(always) {
    clearTimeout(this.acceptedTimer);
    this.acceptedTimer = null;
    if (this.accepted === this.acceptedSent && !(always && this.accepted > 0)) return;
    this.acceptedSent = this.accepted;
    this.acceptedAt = Date.now();
    this.channel.send({ stickyDispatch: 'accepted', count: this.accepted });
  }

  /** serving → stopping (a signal, close()): ask the dispatcher to drain, bounded. */
  stop(reason) {
    if (this.state !== 'serving') return;
    this.state = 'stopping';
    this.deadline = Date.now() + this.drainTimeout;
    // The lanes first: the clients the kernel queues on them from now on wait there for
    // this worker's next process. Then their count, which the drain request ends.
    this.closeLanes();
    this.sendAccepted(true);
    this.channel.send({ stickyDispatch: 'drain-request' });
    // Fallback for a dispatcher that never answers: drain anyway at the deadline.
    this.timer = setTimeout(() => this.drain('timeout'), this.drainTimeout);
    this.reason = reason;
  }

  /** serving or stopping → draining: close the servers, let them finish what they have. */
  drain(reason) {
    if (this.state !== 'serving' && this.state !== 'stopping') return;
    this.state = 'draining';
    clearTimeout(this.timer);
    this.deadline ??= Date.now() + this.drainTimeout;
    this.reason = reason;
    // Open still if the drain came unasked (no stop before it).
    this.closeLanes();
    this.sendAccepted(false);
    for (const sticky of this.servers) {
      sticky.draining = true;
      sticky.emit('drain', reason);
      endResponses(sticky);
      // Every connection handed over serves its request(s) first: only the idle
      // keep-alive connections that have served one are closed now (closeServer,
      // closeIdle). Then what is attached to the server is told it closes
      // (announceClose): socket.io ends its sessions.
      closeServer(sticky.server);
      closeIdle(sticky);
      announceClose(sticky);
    }
    const left = Math.max(0, this.deadline - Date.now());
    this.timer = setTimeout(() => this.cut(), left);
    // A server with no connection open finishes on the next tick, after net's own 'close'.
    process.nextTick(() => {
      for (const sticky of this.servers) this.drained(sticky);
    });
  }

  /** draining: finishes `sticky` once its last connection has closed. */
  drained(sticky) {
    if (this.state !== 'draining' || sticky.sockets.size > 0) return;
    finishServer(sticky);
    this.finish();
  }

  /** draining, at the deadline: cut whatever is still open. */
  cut() {
    for (const sticky of this.servers) {
      if (typeof sticky.server.closeAllConnections === 'function') sticky.server.closeAllConnections();
      for (const socket of sticky.sockets) socket.destroy();
      finishServer(sticky);
    }
    this.finish();
  }

  /** draining → closed once every server has finished: exit, or let go of the channel. */
  finish() {
    if (this.state !== 'draining' || !this.servers.every((s) => s.finished)) return;
    this.state = 'closed';
    clearTimeout(this.timer);
    this.channel.removeListener('message', this.onMessage);
    this.channel.removeListener('disconnect', this.onDisconnect);
    if (this.exit) {
      // After the 'close' handlers (and the promise reactions) of this turn have run.
      setImmediate(() => this.channel.exit());
    } else if (this.channel.connected) {
      // The app exits by itself: let go of the channel that kept the process alive.
      this.channel.disconnect();
    }
  }
}

/** The process's session: listen() adds its servers to it. */
const session = new WorkerSession();

/** Gives a connection to the server as net.Server's own accept path would. */
function handToServer(sticky, socket, info) {
  const server = sticky.server;
  if (server.maxConnections && server._connections >= server.maxConnections) {
    server.emit('drop', {
      localAddress: socket.localAddress,
      localPort: socket.localPort,
      localFamily: socket.localFamily,
      remoteAddress: socket.remoteAddress,
      remotePort: socket.remotePort,
      remoteFamily: socket.remoteFamily,
    });
    socket.destroy();
    return;
  }
  socket.allowHalfOpen = Boolean(server.allowHalfOpen);
  if (server.noDelay) socket.setNoDelay(true);
  if (server.keepAlive) socket.setKeepAlive(true, server.keepAliveInitialDelay * 1000);
  if (server.pauseOnConnect) socket.pause();
  // Counted like an accepted connection (server.getConnections(), maxConnections), but
  // without net's socket._server link: through it, net would emit 'close' on the server
  // whenever its last connection closes, as the server has no listening socket; engine.io
  // (socket.io) shuts itself down on that event. 'close' comes at the drain (announceClose).
  server._connections++;
  socket.server = server;
  sticky.sockets.add(socket);
  socket[kSticky] = sticky;
  socket.once('close', handedSocketClosed);
  sticky.emit('connection', socket, info);
  server.emit('connection', socket);
}

// The StickyServer a handed socket belongs to, for handedSocketClosed: one shared
// listener rather than a closure per connection.
const kSticky = Symbol('stickyDispatchServer');

/** 'close' of a socket handToServer gave its server (`this`). */
function handedSocketClosed() {
  const sticky = this[kSticky];
  sticky.server._connections--;
  sticky.sockets.delete(this);
  if (sticky.draining) sticky._session.drained(sticky);
}

/** Closes a connection for a listener no server takes. */
function noServer(listener, socket) {
  warnOnce(`listener-${listener}`, `no server for listener "${listener}": its connections are closed`);
  socket.destroy();
}

const warned = new Set();
function warnOnce(key, text) {
  if (warned.has(key)) return;
  warned.add(key);
  process.emitWarning(text, 'StickyDispatchWarning');
}

// --- listen() ---------------------------------------------------------------------------

/** Validated options; fallbackPort is null unless the caller opted in to falling back. */
function checkOptions(options) {
  if (options === undefined || options === null) return { fallbackPort: null };
  if (typeof options !== 'object') throw new TypeError('sticky-dispatch: options must be an object');
  const { drainTimeout, listener, fallbackPort, fallbackHost, exit } = options;
  if (drainTimeout !== undefined && !(Number.isFinite(drainTimeout) && drainTimeout >= 0)) {
    throw new TypeError('sticky-dispatch: drainTimeout must be a number of milliseconds >= 0');
  }
  if (listener !== undefined && listener !== null && typeof listener !== 'string') {
    throw new TypeError('sticky-dispatch: listener must be a string');
  }
  if (fallbackHost !== undefined && typeof fallbackHost !== 'string') {
    throw new TypeError('sticky-dispatch: fallbackHost must be a string');
  }
  if (exit !== undefined && typeof exit !== 'boolean') {
    throw new TypeError('sticky-dispatch: exit must be a boolean');
  }
  if (fallbackPort !== undefined && fallbackPort !== null && fallbackPort !== '') {
    const port = Number(fallbackPort);
    if (!Number.isInteger(port) || port < 0 || port > 65535) {
      throw new TypeError(`sticky-dispatch: fallbackPort must be a port number, not ${fallbackPort}`);
    }
    return { ...options, fallbackPort: port };
  }
  return { ...options, fallbackPort: null };
}

/**
 * Serves `server` with the connections the dispatcher hands to this process. Replaces
 * `server.listen(port)`: calling it tells the bridge that the app is ready.
 *
 * Options: drainTimeout (ms, default 30000), listener (name of the dispatcher listener
 * whose connections this server takes; default all), fallbackPort/fallbackHost (listen
 * there directly when not started by the bridge, instead of throwing), exit (default
 * true: exit once drained). An optional last argument is called on 'listening'.
 */
function listen(server, options, callback) {
  if (typeof options === 'function') {
    callback = options;
    options = undefined;
  }
  if (!(server instanceof net.Server)) {
    throw new TypeError('sticky-dispatch: listen() takes a server (http, https, tls, net or express\'s http.createServer(app))');
  }
  const opts = checkOptions(options);
  if (typeof callback === 'function') server.once('listening', callback);

  const problem = bridgeProblem();
  if (problem) {
    if (opts.fallbackPort === null) throw new NoBridgeError(problem);
    const sticky = new StickyServer(server, opts.listener ?? null, 'fallback');
    trackResponses(sticky);
    server.once('listening', () => sticky._resolveListening());
    server.listen(opts.fallbackPort, opts.fallbackHost);
    return sticky;
  }
  const sticky = new StickyServer(server, opts.listener ?? null, 'bridge', session);
  session.add(sticky, opts);
  return sticky;
}

exports.listen = listen;
exports.index = index;
exports.workerIndex = workerIndex;
exports.connectionInfo = connectionInfo;
exports.NoBridgeError = NoBridgeError;
exports.DEFAULT_DRAIN_TIMEOUT = DEFAULT_DRAIN_TIMEOUT;

// For the package's own tests (node/test), not part of the API: under a registered symbol,
// out of Object.keys(), of ES modules' named exports and of the declarations.
Object.defineProperty(exports, Symbol.for('sticky-dispatch.internals'), {
  value: Object.freeze({ ENV_INDEX, DEFAULT_DRAIN_TIMEOUT, ACCEPTED_INTERVAL, StickyServer, WorkerSession }),
});
