'use strict';
// Test app: an http server (https with APP_TLS_KEY/APP_TLS_CERT) served with
// sticky-dispatch, answering with what it sees of each request. Routes:
//   /       JSON: the socket's addresses, connectionInfo(), index, pid
//   /slow   answers only once the drain has begun (a request in flight across it);
//           sends {app: 'slow-started'} on the IPC channel when it has the request
//   /stream sends its headers and a first chunk, the rest once the drain has begun;
//           sends {app: 'stream-started'}
//   /hang   never answers; sends {app: 'hang-started'}
//   /stop   calls close() on the handle (as SIGTERM would), answers at once
// Settings: APP_DRAIN_TIMEOUT (ms), APP_FALLBACK_PORT, APP_EXIT=false, APP_KEEP_ALIVE_TIMEOUT,
// APP_CLOSE_IDLE_PRE_REQUEST (below).
const fs = require('node:fs');
const http = require('node:http');
const https = require('node:https');
const sticky = require('../..');

const tlsOptions = process.env.APP_TLS_KEY
  ? { key: fs.readFileSync(process.env.APP_TLS_KEY), cert: fs.readFileSync(process.env.APP_TLS_CERT) }
  : null;
const server = tlsOptions ? https.createServer(tlsOptions, onRequest) : http.createServer(onRequest);

// For the tests that must not be ended by Node's own keep-alive timeout (5 s).
if (process.env.APP_KEEP_ALIVE_TIMEOUT) server.keepAliveTimeout = Number(process.env.APP_KEEP_ALIVE_TIMEOUT);

// APP_CLOSE_IDLE_PRE_REQUEST=1: closeIdleConnections() (which http's close() calls) also
// destroys the connections that have not sent a request yet, as Node's own does in the
// releases with nodejs/node#63470 (Node 20 keeps them).
if (process.env.APP_CLOSE_IDLE_PRE_REQUEST) {
  const open = new Set();
  const requested = new WeakSet();
  server.on('connection', (socket) => {
    open.add(socket);
    socket.once('close', () => open.delete(socket));
  });
  server.on('request', (req) => requested.add(req.socket));
  const nodeOwn = server.closeIdleConnections;
  server.closeIdleConnections = function closeIdleConnections() {
    for (const socket of open) if (!requested.has(socket)) socket.destroy();
    return nodeOwn.call(this);
  };
}

function tell(msg) {
  if (process.connected) process.send(msg);
}

let drainBegun = false;
const waitingForDrain = [];

function whoami(req) {
  const s = req.socket;
  return {
    remoteAddress: s.remoteAddress,
    remotePort: s.remotePort,
    remoteFamily: s.remoteFamily,
    localAddress: s.localAddress,
    localPort: s.localPort,
    encrypted: Boolean(s.encrypted),
    info: sticky.connectionInfo(s) ?? null,
    index: sticky.index,
    workerIndex: sticky.workerIndex(),
    pid: process.pid,
  };
}

function onRequest(req, res) {
  res.setHeader('content-type', 'application/json');
  if (req.url === '/slow') {
    tell({ app: 'slow-started' });
    const answer = () => res.end(JSON.stringify({ ...whoami(req), answered: 'after drain began' }));
    if (drainBegun) answer();
    else waitingForDrain.push(answer);
    return;
  }
  if (req.url === '/stream') {
    // Headers (keep-alive) and a first chunk now, the rest once the drain has begun.
    res.write('first part;');
    tell({ app: 'stream-started' });
    // A turn later than the drain's start: still in flight when the package closes the
    // server (a response already ended counts as idle for Node's closeIdleConnections).
    const finish = () => setImmediate(() => res.end('last part'));
    if (drainBegun) finish();
    else waitingForDrain.push(finish);
    return;
  }
  if (req.url === '/hang') {
    tell({ app: 'hang-started' });
    return;
  }
  if (req.url === '/stop') {
    handle.close();
  }
  res.end(JSON.stringify(whoami(req)));
}

server.on('listening', () => {
  tell({ app: 'listening' });
  if (handle && handle.mode === 'fallback') console.log(`listening port=${server.address().port}`);
});

const options = {};
if (process.env.APP_DRAIN_TIMEOUT) options.drainTimeout = Number(process.env.APP_DRAIN_TIMEOUT);
if (process.env.APP_FALLBACK_PORT !== undefined) options.fallbackPort = process.env.APP_FALLBACK_PORT;
if (process.env.APP_EXIT === 'false') options.exit = false;

const handle = sticky.listen(server, options);
server.on('close', () => tell({ app: 'server-close' }));
handle.on('connection', (socket, info) => {
  tell({ app: 'connection-opened', seq: info.seq });
  socket.on('close', () => tell({ app: 'connection-closed', seq: info.seq }));
});
handle.on('drain', (reason) => {
  drainBegun = true;
  tell({ app: 'drain', reason });
  for (const answer of waitingForDrain.splice(0)) answer();
});
handle.closed.then(() => {
  if (options.exit === false) console.log('closed: exiting by myself');
});
