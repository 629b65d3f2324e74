// A socket.io chat served through sticky-dispatch: the Node twin of the Rust demo's chat
// (src/bin/sticky-dispatch-demo/chat.rs), for tests/node/socketio-clients.js.
//
//   sticky-dispatch --listen 127.0.0.1:8080 --workers 4 -- sticky-dispatch node-worker -- node tests/node/apps/chat.js
//
// and open http://127.0.0.1:8080/ in a browser. What it serves:
// - `GET /` from a browser (`Accept: text/html`): a page (chat.html) that shows which
//   worker served it and chats in a room, with the browser client socket.io serves itself
//   at /socket.io/socket.io.js;
// - `GET /slow?ms=N` (N <= 10000): `started` at once, `finished` N ms later: a request in
//   progress across a restart;
// - any other path outside /socket.io/, and `/` for everyone else (curl): the plain-text
//   lines of the Rust demo,
//     worker=<index> pid=<pid> client=<ip>
//     listener=<name> local=<addr:port>
// - socket.io at /socket.io/, namespace /:
//   - on connect the server emits `hello` with the `worker=… pid=… client=…` line;
//   - `join(room)` puts the socket in `room` and acknowledges with that line;
//   - `message({room, text})` goes to everyone in `room`, the sender included, as
//     `message({room, text, from, worker})`.
// Rooms live in each process's memory (socket.io's default adapter): that is why a
// socket.io server behind several processes needs sticky sessions.
//
// Environment (no STICKY_DISPATCH_ prefix: the dispatcher refuses unknown variables of its own):
// - CHAT_READY_DELAY_MS=N  wait N ms before listen(): an app with an asynchronous
//   start-up. Under sticky-dispatch, clients wait at the dispatcher meanwhile.
// - CHAT_CLUSTER_PORT=P [CHAT_WORKERS=4] [CHAT_CLUSTER_HOST=127.0.0.1]  no sticky-dispatch:
//   Node's own cluster module, round-robin, NOT sticky (the baseline where long-polling
//   breaks). The primary prints `chat cluster listening on HOST:PORT workers=N` once
//   every worker listens.
// - CHAT_CLOSE_ON_DRAIN=0  no `'drain'` handler: the app exactly as socket.io's examples
//   write it, for the restart test (the package ends socket.io's sessions by itself).
//
// On the bridge's drain it closes socket.io (each client is told, and reconnects to the
// restarted worker through the dispatcher), then the package exits once drained.
'use strict';

const cluster = require('node:cluster');
const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');
const { Server } = require('socket.io');
// The package from this repository (node/), not from npm.
const sticky = require(path.join(__dirname, '..', '..', '..', 'node'));

/** Room names and message texts longer than this are refused (it is a demo, not storage). */
const MAX_TEXT = 1000;
/** The page for browsers; {{WHO}} becomes the two lines of describe(). */
const PAGE = fs.readFileSync(path.join(__dirname, 'chat.html'), 'utf8');

const clusterPort = process.env.CHAT_CLUSTER_PORT;
const readyDelay = Number(process.env.CHAT_READY_DELAY_MS || 0);
const closeOnDrain = process.env.CHAT_CLOSE_ON_DRAIN !== '0';
/** The longest `GET /slow?ms=N` it accepts. */
const MAX_SLOW_MS = 10000;

if (clusterPort !== undefined && cluster.isPrimary) {
  runClusterPrimary();
} else {
  const index = clusterPort !== undefined ? Number(process.env.CHAT_WORKER_INDEX) : sticky.index;
  setTimeout(() => serve(index), readyDelay);
}

function formatAddress(addr) {
  if (!addr || !addr.address) return '-';
  return addr.family === 'IPv6' ? `[${addr.address}]:${addr.port}` : `${addr.address}:${addr.port}`;
}

/** The demo's two lines for the client on `socket` (`client`: as socket.io saw it). */
function describe(index, socket, client = socket.remoteAddress) {
  const info = sticky.connectionInfo(socket);
  const listener = info ? info.listener ?? '-' : '-';
  const local = info
    ? formatAddress(info.local)
    : formatAddress({ address: socket.localAddress, port: socket.localPort, family: socket.localFamily });
  return `worker=${index} pid=${process.pid} client=${client || '-'}\nlistener=${listener} local=${local}\n`;
}

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** Whether the request asks for HTML (a browser), as the Rust demo decides. */
function wantsHtml(req) {
  return (req.headers.accept || '').split(',').some((kind) => kind.trim().startsWith('text/html'));
}

function serve(index) {
  const server = http.createServer((req, res) => {
    const who = describe(index, req.socket);
    const url = new URL(req.url, 'http://chat');
    const ms = Number(url.searchParams.get('ms'));
    if (url.pathname === '/slow' && Number.isInteger(ms) && ms >= 0 && ms <= MAX_SLOW_MS) {
      res.setHeader('content-type', 'text/plain; charset=utf-8');
      res.write('started\n');
      setTimeout(() => res.end(`finished\n${who}`), ms);
      return;
    }
    if (req.url.split('?')[0] === '/' && wantsHtml(req)) {
      res.setHeader('content-type', 'text/html; charset=utf-8');
      res.end(PAGE.replace('{{WHO}}', escapeHtml(who)));
      return;
    }
    res.setHeader('content-type', 'text/plain; charset=utf-8');
    res.end(who);
  });
  const io = new Server(server);

  io.on('connection', (socket) => {
    // The first line, with the client as socket.io saw it at the handshake (the
    // handshake's connection may be closed by now: long-polling).
    const who = describe(index, socket.request.socket, socket.handshake.address).split('\n')[0];
    socket.emit('hello', who);
    socket.on('join', (room, ack) => {
      if (typeof room !== 'string' || room.length > MAX_TEXT) return;
      socket.join(room);
      if (typeof ack === 'function') ack(who);
    });
    socket.on('message', (message) => {
      if (!message || typeof message.room !== 'string' || typeof message.text !== 'string') return;
      if (message.room.length > MAX_TEXT || message.text.length > MAX_TEXT) return;
      // io.to(): everyone in the room on this process, the sender included.
      io.to(message.room).emit('message', { room: message.room, text: message.text, from: socket.id, worker: index });
    });
  });

  if (clusterPort !== undefined) {
    server.listen(Number(clusterPort), process.env.CHAT_CLUSTER_HOST || '127.0.0.1');
    return;
  }
  const handle = sticky.listen(server);
  if (closeOnDrain) handle.on('drain', () => io.close());
}

function runClusterPrimary() {
  const workers = Number(process.env.CHAT_WORKERS || 4);
  const host = process.env.CHAT_CLUSTER_HOST || '127.0.0.1';
  // Round-robin by the primary (Node's default except on Windows), stated for clarity.
  cluster.schedulingPolicy = cluster.SCHED_RR;
  let listening = 0;
  cluster.on('listening', () => {
    listening += 1;
    if (listening === workers) console.log(`chat cluster listening on ${host}:${clusterPort} workers=${workers}`);
  });
  for (let i = 0; i < workers; i++) cluster.fork({ CHAT_WORKER_INDEX: String(i) });
  const stop = () => {
    for (const worker of Object.values(cluster.workers)) worker.kill();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}
