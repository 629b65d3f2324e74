// Real socket.io clients that stay connected through a worker's restart, for the restart
// test of tests/node_worker.rs (issue 22), against tests/node/apps/chat.js (`hello` on
// connect with `worker=N pid=P client=C`; `join(room)` acknowledged):
//
//   node restart-clients.js URL IP...
//
// One client per source address, with socket.io-client's default reconnection; the
// first half websocket only, the second half polling only (each polling request a new
// connection from the client's address). Each connects, gets `hello` and joins a room
// (acknowledged), then prints
//   connected ip=IP transport=T pid=P
// and stays. A later `hello` from another process (socket.io reconnected the client)
// prints
//   reconnected ip=IP transport=T pid=P after=REASON
// (REASON: why the first session ended, as socket.io-client says), and once every client
// has reconnected: `all reconnected clients=N`, exit 0. Bounded: LIMIT_MS (default 90000),
// then `gave up: ...` and exit status 1. Everything goes to stderr.
'use strict';

const http = require('node:http');
const { io } = require('socket.io-client');

const [url, ...ips] = process.argv.slice(2);
if (!url || ips.length === 0) {
  console.error('usage: node restart-clients.js URL IP...');
  process.exit(2);
}
const LIMIT_MS = Number(process.env.LIMIT_MS || 90000);

const field = (line, name) => (String(line).match(new RegExp(`${name}=(\\S+)`)) || [])[1];

const clients = ips.map((ip, n) => {
  const transport = n < ips.length / 2 ? 'websocket' : 'polling';
  const agent = new http.Agent({ localAddress: ip, keepAlive: false });
  const socket = io(url, { transports: [transport], agent, localAddress: ip, forceNew: true });
  const client = { ip, transport, socket, agent, firstPid: null, done: false, reason: null };
  client.joined = new Promise((resolve, reject) => {
    socket.on('connect_error', (err) => {
      if (client.firstPid === null) reject(new Error(`${ip}: connect_error: ${err.message}`));
    });
    socket.on('disconnect', (reason) => {
      client.reason ??= reason;
    });
    socket.on('hello', (line) => {
      const pid = field(line, 'pid');
      if (client.firstPid === null) {
        client.firstPid = pid;
        socket.emit('join', 'restart', () => resolve());
      } else if (pid !== client.firstPid && !client.done) {
        client.done = true;
        console.error(`reconnected ip=${ip} transport=${transport} pid=${pid} after=${client.reason}`);
        if (clients.every((c) => c.done)) finish(0, `all reconnected clients=${clients.length}`);
      }
    });
  });
  return client;
});

const limit = setTimeout(() => {
  const missing = clients.filter((c) => !c.done).map((c) => `${c.ip}/${c.transport} (${c.reason || 'still connected'})`);
  finish(1, `gave up: after ${LIMIT_MS} ms, not reconnected: ${missing.join(', ')}`);
}, LIMIT_MS);

function finish(status, line) {
  clearTimeout(limit);
  console.error(line);
  for (const c of clients) {
    c.socket.close();
    c.agent.destroy();
  }
  process.exit(status);
}

Promise.all(clients.map((c) => c.joined)).then(
  () => {
    for (const c of clients) console.error(`connected ip=${c.ip} transport=${c.transport} pid=${c.firstPid}`);
  },
  (err) => finish(1, `gave up: ${err.message}`),
);
