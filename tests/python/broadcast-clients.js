// Real socket.io clients (npm's socket.io-client, from tests/node: run with
// NODE_PATH=tests/node/node_modules) for the broadcast tests of tests/python.rs, one per
// source address, against apps shaped like python-socketio's examples:
//
//   node broadcast-clients.js URL IP...
//
// The apps emit `my_response` ({data: "Connected", worker?, client?} on connect), answer
// `my_broadcast_event` ({data}) with `my_response` ({data}) to every client, may emit
// `users` ({count}, the number of connected clients) and, from a background task,
// `my_response` ({data: "Server generated event", count}).
//
// Phases, all clients together, each bounded by PHASE_MS:
//   1. connect (TRANSPORTS: "polling" or "polling,websocket", which upgrades) and receive
//      `my_response` "Connected";
//   2. USERS=1: wait for a `users` count equal to the number of clients (any one: the
//      workers' counts may arrive out of order);
//   3. the first client emits `my_broadcast_event`; every client waits for it;
//   4. TICKS=n: every client waits for n "Server generated event" messages.
// Prints one line per client, then a summary:
//   client ip=IP ok=true|false worker=N client=C transport=T users=U broadcast=true|false
//     ticks=1,2,... error=TEXT
//   summary clients=N ok=N failed=N
"use strict";

const http = require("node:http");
const { io } = require("socket.io-client");

const [url, ...ips] = process.argv.slice(2);
if (!url || ips.length === 0) {
  console.error("usage: NODE_PATH=tests/node/node_modules node broadcast-clients.js URL IP...");
  process.exit(2);
}
const PHASE_MS = Number(process.env.PHASE_MS || 20000);
const TRANSPORTS = (process.env.TRANSPORTS || "polling").split(",");
const USERS = process.env.USERS === "1";
const TICKS = Number(process.env.TICKS || 0);

function deadline(ms, what) {
  let timer;
  const promise = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
  });
  return { promise, cancel: () => clearTimeout(timer) };
}

/// Runs `step` unless the client already failed; records the first failure.
async function phase(client, what, step) {
  if (client.error) return;
  const limit = deadline(PHASE_MS, what);
  try {
    await Promise.race([step(), client.failed, limit.promise]);
  } catch (err) {
    client.error ??= `${what}: ${err.message}`;
  } finally {
    limit.cancel();
  }
}

/// Resolves once `test()` holds, checking whenever the client receives something.
function until(client, test) {
  return new Promise((resolve) => {
    const check = () => {
      if (test()) {
        client.waiters.delete(check);
        resolve();
      }
    };
    client.waiters.add(check);
    check();
  });
}

async function main() {
  const broadcastText = `broadcast from ${ips[0]}`;
  const clients = ips.map((ip) => {
    const agent = new http.Agent({ localAddress: ip, keepAlive: false });
    const socket = io(url, {
      transports: TRANSPORTS,
      agent,
      localAddress: ip,
      forceNew: true,
      reconnection: false,
      timeout: PHASE_MS,
    });
    const client = {
      ip,
      socket,
      agent,
      error: null,
      connected: null,
      users: null,
      sawAllUsers: false,
      broadcast: false,
      ticks: [],
      waiters: new Set(),
    };
    const wake = () => client.waiters.forEach((check) => check());
    client.failed = new Promise((_, reject) => {
      socket.on("connect_error", (err) => reject(new Error(`connect_error: ${err.message}`)));
      socket.on("disconnect", (reason) => reject(new Error(`disconnected: ${reason}`)));
    });
    client.failed.catch((err) => {
      if (!client.finished) client.error ??= err.message;
    });
    socket.on("my_response", (message) => {
      if (message && message.data === "Connected") client.connected ??= message;
      else if (message && message.data === "Server generated event") client.ticks.push(message.count);
      else if (message && message.data === broadcastText) client.broadcast = true;
      wake();
    });
    socket.on("users", (message) => {
      client.users = message.count;
      if (message.count === ips.length) client.sawAllUsers = true;
      wake();
    });
    return client;
  });

  await Promise.all(clients.map((c) => phase(c, "connect", () => until(c, () => c.connected))));
  if (USERS) {
    await Promise.all(
      clients.map((c) => phase(c, "users", () => until(c, () => c.sawAllUsers))),
    );
  }
  if (!clients[0].error) clients[0].socket.emit("my_broadcast_event", { data: broadcastText });
  await Promise.all(clients.map((c) => phase(c, "broadcast", () => until(c, () => c.broadcast))));
  if (TICKS > 0) {
    await Promise.all(
      clients.map((c) => phase(c, "ticks", () => until(c, () => c.ticks.length >= TICKS))),
    );
  }

  let ok = 0;
  for (const c of clients) {
    c.finished = true;
    const good = !c.error;
    if (good) ok += 1;
    const connected = c.connected || {};
    console.log(
      [
        "client",
        `ip=${c.ip}`,
        `ok=${good}`,
        `worker=${connected.worker ?? "-"}`,
        `client=${connected.client ?? "-"}`,
        `transport=${c.socket.io.engine ? c.socket.io.engine.transport.name : "-"}`,
        `users=${c.sawAllUsers ? ips.length : (c.users ?? "-")}`,
        `broadcast=${c.broadcast}`,
        `ticks=${c.ticks.join(",") || "-"}`,
        `error=${c.error || "-"}`,
      ].join(" "),
    );
    c.socket.disconnect();
    c.agent.destroy();
  }
  console.log(`summary clients=${clients.length} ok=${ok} failed=${clients.length - ok}`);
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(err);
    process.exit(1);
  },
);
