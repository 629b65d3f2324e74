// Real socket.io clients for tests/socketio.rs, one per source address, long-polling only.
//
//   node socketio-clients.js URL IP...
//
// Each client binds its TCP connections to its IP (an http.Agent with localAddress and no
// keep-alive: every long-polling request is a new connection, which the dispatcher must
// route to the same worker as the handshake). Phases, all clients together:
//   1. connect (engine.io handshake + socket.io CONNECT) and receive the server's `hello`;
//   2. join room `room-<i mod 5>` (acknowledged by the server);
//   3. everyone who joined sends one message to its room;
//   4. each waits for the messages of every joined client in its room on the same worker
//      (rooms are per worker process), its own included.
// Prints one line per client, then a summary:
//   client ip=IP ok=true|false received=R expected=E worker=N pid=P client=C error=TEXT
//   summary clients=N ok=N failed=N
"use strict";

const http = require("node:http");
const { io } = require("socket.io-client");

const [url, ...ips] = process.argv.slice(2);
if (!url || ips.length === 0) {
  console.error("usage: node socketio-clients.js URL IP...");
  process.exit(2);
}
const PHASE_MS = Number(process.env.PHASE_MS || 20000);
const ROOMS = 5;

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

function field(line, name) {
  const word = (line || "").split(/\s+/).find((w) => w.startsWith(`${name}=`));
  return word ? word.slice(name.length + 1) : "-";
}

async function main() {
  const clients = ips.map((ip, i) => {
    const agent = new http.Agent({ localAddress: ip, keepAlive: false });
    const socket = io(url, {
      transports: ["polling"],
      agent,
      forceNew: true,
      reconnection: false,
      timeout: PHASE_MS,
    });
    const client = { ip, room: `room-${i % ROOMS}`, socket, agent, error: null, who: null, received: new Set() };
    // Rejects on the first connect error or disconnection: every phase races it.
    client.failed = new Promise((_, reject) => {
      socket.on("connect_error", (err) => reject(new Error(`connect_error: ${err.message}`)));
      socket.on("disconnect", (reason) => reject(new Error(`disconnected: ${reason}`)));
    });
    client.failed.catch((err) => {
      if (!client.finished) client.error ??= err.message;
    });
    client.hello = new Promise((resolve) => socket.once("hello", resolve));
    socket.on("message", (message) => {
      if (message && message.room === client.room) client.received.add(message.text);
    });
    return client;
  });

  await Promise.all(
    clients.map((c) =>
      phase(c, "connect", async () => {
        c.who = await c.hello;
      }),
    ),
  );
  await Promise.all(
    clients.map((c) =>
      phase(c, "join", async () => {
        const ack = await c.socket.emitWithAck("join", c.room);
        if (field(ack, "worker") !== field(c.who, "worker")) {
          throw new Error(`joined on another worker: ${ack} after ${c.who}`);
        }
      }),
    ),
  );
  const joined = clients.filter((c) => !c.error);
  for (const c of joined) {
    c.expected = joined
      .filter((d) => d.room === c.room && field(d.who, "worker") === field(c.who, "worker"))
      .map((d) => `hello from ${d.ip}`);
  }
  for (const c of joined) c.socket.emit("message", { room: c.room, text: `hello from ${c.ip}` });
  await Promise.all(
    joined.map((c) =>
      phase(
        c,
        "messages",
        () =>
          new Promise((resolve) => {
            const check = () => {
              if (c.expected.every((text) => c.received.has(text))) resolve();
              else setTimeout(check, 10);
            };
            check();
          }),
      ),
    ),
  );

  let ok = 0;
  for (const c of clients) {
    c.finished = true;
    const good = !c.error;
    if (good) ok += 1;
    console.log(
      [
        "client",
        `ip=${c.ip}`,
        `ok=${good}`,
        `received=${c.received.size}`,
        `expected=${c.expected ? c.expected.length : 0}`,
        `worker=${field(c.who, "worker")}`,
        `pid=${field(c.who, "pid")}`,
        `client=${field(c.who, "client")}`,
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
