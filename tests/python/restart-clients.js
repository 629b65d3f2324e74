// Real socket.io clients (npm's socket.io-client, from tests/node: run with
// NODE_PATH=tests/node/node_modules) for the restart tests of tests/python.rs (#22), one
// per source address, against the test chat (`hello` on connect with
// `worker=N pid=P client=C`; `join(room)` acknowledged):
//
//   node restart-clients.js URL MODE IP...
//
// Clients alternate transports: the first websocket only, the second polling only, ...
// Each connects, gets `hello` and joins a room (acknowledged). Then, by MODE:
//   leave: every client disconnects; prints `left clients=N` and exits.
//   stay:  prints `connected ip=IP transport=T pid=P` per client and stays; every later
//          `hello` (after socket.io reconnected the client) prints
//          `reconnected ip=IP transport=T pid=P after=REASON`; exits once every client
//          has reconnected to another process than its first.
// Everything goes to stderr (what the tests capture). Bounded: LIMIT_MS (default 60000),
// then `gave up: ...` and exit status 1.
"use strict";

const http = require("node:http");
const { io } = require("socket.io-client");

const [url, mode, ...ips] = process.argv.slice(2);
if (!url || !["leave", "stay"].includes(mode) || ips.length === 0) {
  console.error("usage: NODE_PATH=tests/node/node_modules node restart-clients.js URL leave|stay IP...");
  process.exit(2);
}
const LIMIT_MS = Number(process.env.LIMIT_MS || 60000);

const limit = setTimeout(() => {
  const missing = clients.filter((c) => !c.done).map((c) => `${c.ip} (${c.lastReason || "-"})`);
  console.error(`gave up: after ${LIMIT_MS} ms, waiting for ${missing.join(", ")}`);
  process.exit(1);
}, LIMIT_MS);

const field = (line, name) => (line.match(new RegExp(`${name}=(\\S+)`)) || [])[1];

const clients = ips.map((ip, n) => {
  const transport = n % 2 === 0 ? "websocket" : "polling";
  const agent = new http.Agent({ localAddress: ip, keepAlive: false });
  const socket = io(url, {
    transports: [transport],
    agent,
    localAddress: ip,
    forceNew: true,
    reconnectionDelay: 100,
    reconnectionDelayMax: 500,
  });
  const client = { ip, transport, socket, agent, firstPid: null, done: false, lastReason: null };
  client.joined = new Promise((resolve, reject) => {
    socket.on("connect_error", (err) => {
      if (client.firstPid === null) reject(new Error(`${ip}: connect_error: ${err.message}`));
    });
    socket.on("disconnect", (reason) => {
      client.lastReason = reason;
    });
    socket.on("hello", (line) => {
      const pid = field(line, "pid");
      if (client.firstPid === null) {
        client.firstPid = pid;
        socket.emit("join", "restart", () => resolve());
      } else if (pid !== client.firstPid && !client.done) {
        client.done = true;
        console.error(
          `reconnected ip=${ip} transport=${transport} pid=${pid} after=${client.lastReason}`,
        );
        if (clients.every((c) => c.done)) finish(0);
      }
    });
  });
  return client;
});

function finish(status) {
  clearTimeout(limit);
  for (const c of clients) {
    c.socket.close();
    c.agent.destroy();
  }
  process.exit(status);
}

Promise.all(clients.map((c) => c.joined)).then(
  () => {
    if (mode === "leave") {
      for (const c of clients) {
        c.socket.close();
        c.agent.destroy();
      }
      console.error(`left clients=${clients.length}`);
      clearTimeout(limit);
      process.exit(0);
    }
    for (const c of clients) {
      console.error(`connected ip=${c.ip} transport=${c.transport} pid=${c.firstPid}`);
    }
  },
  (err) => {
    console.error(`gave up: ${err.message}`);
    process.exit(1);
  },
);
