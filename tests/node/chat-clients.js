// Real socket.io clients for the broadcast tests of tests/node_worker.rs, one per source
// address, against chats shaped like socket.io's own examples:
//
//   PROTOCOL=chat|tutorial node chat-clients.js URL IP...
//
// - PROTOCOL=chat (default): socket.io's chat example (tests/node/apps/redis-chat.js,
//   tests/node/converting/*/express-chat.js): each client emits `add user` (its IP) and
//   gets `login` {numUsers, worker?, client?}; `user joined` / `user left` carry
//   numUsers; the first client's `new message` reaches everyone else as `new message`
//   {username, message}; worker 0 may emit `tick` {count}.
// - PROTOCOL=tutorial: socket.io's "get started" chat (tests/node/converting/*/http-chat.js):
//   `chat message` (text) from a client goes to everyone, the sender included.
//
// Phases, all clients together, each bounded by PHASE_MS:
//   1. connect (TRANSPORTS: "polling", or "polling,websocket", then wait for the upgrade)
//      and, for the chat, log in;
//   2. USERS=1 (chat): wait until a client has seen a numUsers equal to the number of
//      clients (the counts arrive out of order across workers: the largest is kept);
//   3. the first client sends one message; every client that should get it waits for it;
//   4. TICKS=n (chat): every client waits for n ticks.
// Prints one line per client, then a summary:
//   client ip=IP ok=true|false worker=N|- client=C|- transport=T users=U|- broadcast=true|false
//     ticks=1,2,... error=TEXT
//   summary clients=N ok=N failed=N
"use strict";

const http = require("node:http");
const { io } = require("socket.io-client");

const [url, ...ips] = process.argv.slice(2);
if (!url || ips.length === 0) {
  console.error("usage: PROTOCOL=chat|tutorial node chat-clients.js URL IP...");
  process.exit(2);
}
const PROTOCOL = process.env.PROTOCOL || "chat";
if (PROTOCOL !== "chat" && PROTOCOL !== "tutorial") {
  console.error(`PROTOCOL=${PROTOCOL}: chat or tutorial`);
  process.exit(2);
}
const PHASE_MS = Number(process.env.PHASE_MS || 20000);
const TRANSPORTS = (process.env.TRANSPORTS || "polling").split(",");
const USERS = process.env.USERS === "1";
const TICKS = Number(process.env.TICKS || 0);

function deadline(ms, what) {
  let timer;
  const promise = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
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

/// Resolves once `test()` holds, checked whenever the client receives something.
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

function transportOf(client) {
  const engine = client.socket.io.engine;
  return engine && engine.transport ? engine.transport.name : "-";
}

async function main() {
  const text = `hello from ${ips[0]}`;
  const clients = ips.map((ip) => {
    const agent = new http.Agent({ localAddress: ip, keepAlive: false });
    const socket = io(url, {
      transports: TRANSPORTS,
      agent, // polling: every request a new connection from this address
      localAddress: ip, // the websocket
      forceNew: true,
      reconnection: false,
      timeout: PHASE_MS,
    });
    const client = {
      ip,
      socket,
      agent,
      error: null,
      login: null,
      users: 0,
      broadcast: 0,
      ticks: [],
      waiters: new Set(),
    };
    const notify = () => {
      for (const check of [...client.waiters]) check();
    };
    // Rejects on the first connect error or disconnection: every phase races it.
    client.failed = new Promise((_, reject) => {
      socket.on("connect_error", (err) => reject(new Error(`connect_error: ${err.message}`)));
      socket.on("disconnect", (reason) => reject(new Error(`disconnected: ${reason}`)));
    });
    client.failed.catch((err) => {
      if (!client.finished) client.error ??= err.message;
    });
    socket.on("connect", notify);
    const seeUsers = (n) => {
      if (Number.isInteger(n)) client.users = Math.max(client.users, n);
      notify();
    };
    socket.on("login", (data) => {
      client.login = data || {};
      seeUsers(client.login.numUsers);
    });
    socket.on("user joined", (data) => seeUsers(data && data.numUsers));
    socket.on("user left", (data) => seeUsers(data && data.numUsers));
    socket.on("new message", (data) => {
      if (data && data.username === ips[0] && data.message === text) client.broadcast += 1;
      notify();
    });
    socket.on("chat message", (message) => {
      if (message === text) client.broadcast += 1;
      notify();
    });
    socket.on("tick", (data) => {
      client.ticks.push(data && data.count);
      notify();
    });
    return client;
  });

  await Promise.all(
    clients.map((c) =>
      phase(c, "connect", async () => {
        await until(c, () => c.socket.connected);
        if (TRANSPORTS.includes("websocket")) {
          await new Promise((resolve) => {
            if (transportOf(c) === "websocket") resolve();
            else c.socket.io.engine.once("upgrade", resolve);
          });
        }
        if (PROTOCOL === "chat") {
          c.socket.emit("add user", c.ip);
          await until(c, () => c.login !== null);
        }
      }),
    ),
  );
  if (USERS) {
    await Promise.all(clients.map((c) => phase(c, "users", () => until(c, () => c.users >= clients.length))));
  }
  const sender = clients[0];
  // The chat example's `new message` goes to everyone but the sender; the tutorial's
  // `chat message` to everyone.
  const receivers = PROTOCOL === "chat" ? clients.slice(1) : clients;
  if (!sender.error) sender.socket.emit(PROTOCOL === "chat" ? "new message" : "chat message", text);
  await Promise.all(receivers.map((c) => phase(c, "broadcast", () => until(c, () => c.broadcast > 0))));
  if (TICKS > 0) {
    await Promise.all(clients.map((c) => phase(c, "ticks", () => until(c, () => c.ticks.length >= TICKS))));
  }

  let ok = 0;
  for (const c of clients) {
    c.finished = true;
    const good = !c.error;
    if (good) ok += 1;
    const login = c.login || {};
    console.log(
      [
        "client",
        `ip=${c.ip}`,
        `ok=${good}`,
        `worker=${login.worker ?? "-"}`,
        `client=${login.client ?? "-"}`,
        `transport=${transportOf(c)}`,
        `users=${PROTOCOL === "chat" ? c.users : "-"}`,
        `broadcast=${c.broadcast === 1}`,
        `received=${c.broadcast}`,
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
