// Cross-worker broadcast with @socket.io/redis-adapter: a chat shaped like socket.io's own
// chat example (express, a nickname, `add user` / `new message` / `typing`, "there are N
// participants"), served by N Node workers behind sticky-dispatch (docs/node.md, "Broadcast
// across workers"). Run it with a Redis the workers share:
//
//   redis-server --port 6379 --save '' &
//   REDIS_URL=redis://127.0.0.1:6379 sticky-dispatch --listen 127.0.0.1:8080 --workers 4 -- \
//     sticky-dispatch node-worker -- node tests/node/apps/redis-chat.js
//
// and open http://127.0.0.1:8080/ in a browser (from several machines or addresses: each
// client address has its worker). What changes against the one-process example:
// - the adapter: every emit to everyone (or a room) goes through Redis to every worker;
//   without it, it reaches only the clients of the worker that emits;
// - the participant count: a variable would count the users of one worker; it is kept in
//   Redis (INCR/DECR of chat:users), so every worker reports the total;
// - the background task (a `tick` every TICK_MS to everyone): started in every worker it
//   would reach every client N times through the adapter; it runs on worker 0 only.
//
// Protocol (socket.io, namespace /), as the official example's plus two fields:
//   client -> server  `add user` (name), `new message` (text), `typing`, `stop typing`
//   server -> client  `login` {numUsers, worker, client} (to the new user: `worker` is the
//                     index of the worker serving it, `client` the address it saw);
//                     `user joined` / `user left` {username, numUsers}; `new message`
//                     {username, message} (to everyone else); `typing` / `stop typing`
//                     {username}; `tick` {count, worker} (from worker 0, to everyone)
// Environment: REDIS_URL (redis://127.0.0.1:6379), TICK_MS (5000).
'use strict';

const http = require('node:http');
const path = require('node:path');
const express = require('express');
const { Server } = require('socket.io');
const { createClient } = require('redis');
const { createAdapter } = require('@socket.io/redis-adapter');
// The package from this repository (node/); an app says require('sticky-dispatch').
const sticky = require(path.join(__dirname, '..', '..', '..', 'node'));

const REDIS_URL = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
const TICK_MS = Number(process.env.TICK_MS || 5000);
const USERS_KEY = 'chat:users';
const MAX_TEXT = 1000;

async function main() {
  // Two connections: a subscribed Redis connection can do nothing else.
  const pub = createClient({ url: REDIS_URL });
  const sub = pub.duplicate();
  for (const client of [pub, sub]) client.on('error', (err) => console.error(`redis: ${err.message}`));
  await Promise.all([pub.connect(), sub.connect()]);

  const app = express();
  const server = http.createServer(app);
  const io = new Server(server, { adapter: createAdapter(pub, sub) });

  app.get('/', (req, res) => res.type('html').send(PAGE));

  io.on('connection', (socket) => {
    let addedUser = false;

    socket.on('add user', async (username) => {
      if (addedUser || typeof username !== 'string') return;
      addedUser = true;
      socket.username = username.slice(0, MAX_TEXT);
      // The total over every worker, not this process's share.
      const numUsers = await pub.incr(USERS_KEY);
      socket.emit('login', { numUsers, worker: sticky.index, client: socket.handshake.address });
      socket.broadcast.emit('user joined', { username: socket.username, numUsers });
    });

    socket.on('new message', (message) => {
      if (!addedUser || typeof message !== 'string') return;
      // socket.broadcast: everyone but the sender, on every worker (through Redis).
      socket.broadcast.emit('new message', { username: socket.username, message: message.slice(0, MAX_TEXT) });
    });

    socket.on('typing', () => addedUser && socket.broadcast.emit('typing', { username: socket.username }));
    socket.on('stop typing', () => addedUser && socket.broadcast.emit('stop typing', { username: socket.username }));

    socket.on('disconnect', async () => {
      if (!addedUser) return;
      const numUsers = await pub.decr(USERS_KEY);
      socket.broadcast.emit('user left', { username: socket.username, numUsers });
    });
  });

  // Once for the whole app, not once per worker. If worker 0 is down, so is the task
  // until it is restarted (systemd or standalone mode restart it).
  if (sticky.index === 0) {
    let count = 0;
    setInterval(() => io.emit('tick', { count: ++count, worker: sticky.index }), TICK_MS);
  }

  // exit: false, so that the DECRs of the users leaving at the drain reach Redis before
  // the process exits (they are queued on `pub` before QUIT).
  const handle = sticky.listen(server, { exit: false });
  handle.on('drain', () => io.close());
  await handle.closed;
  await Promise.allSettled([pub.quit(), sub.quit()]);
  process.exit(0);
}

const PAGE = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Chat on sticky-dispatch workers</title>
<style>
  body { font: 16px/1.4 system-ui, sans-serif; max-width: 44rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  #log { list-style: none; padding: 0; min-height: 8rem; border: 1px solid #ddd; border-radius: .4rem; }
  #log li { padding: .3rem .75rem; border-bottom: 1px solid #eee; }
  #log .info { color: #777; font-size: .9em; }
  form { display: flex; gap: .5rem; margin: .5rem 0; }
  input { flex: 1; padding: .4rem; font: inherit; }
  button { font: inherit; padding: .4rem 1rem; }
  [hidden] { display: none; }
</style>
</head>
<body data-state="login">
<h1>Chat</h1>
<form id="login"><input id="name" autocomplete="off" placeholder="Your nickname" maxlength="100" autofocus><button>Join</button></form>
<p id="status" hidden></p>
<ul id="log"></ul>
<p id="typing" class="info"></p>
<form id="send" hidden><input id="text" autocomplete="off" placeholder="Say something" maxlength="1000"><button>Send</button></form>
<script src="/socket.io/socket.io.js"></script>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const socket = io();
const typing = new Set();
let me = "";

function add(text, info) {
  const item = document.createElement("li");
  if (info) item.className = "info";
  item.textContent = text;
  $("log").append(item);
}
const participants = (n) => (n === 1 ? "there is 1 participant" : "there are " + n + " participants");
const showTyping = () => ($("typing").textContent = typing.size ? [...typing].join(", ") + " typing…" : "");

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  me = $("name").value.trim();
  if (me) socket.emit("add user", me);
});
socket.on("login", ({ numUsers, worker, client }) => {
  document.body.dataset.state = "chat";
  $("login").hidden = true;
  $("send").hidden = false;
  $("status").hidden = false;
  $("status").textContent = "You are " + me + " (" + client + "), served by worker " + worker + ".";
  add("Welcome: " + participants(numUsers) + ".", true);
  $("text").focus();
});
socket.on("user joined", ({ username, numUsers }) => add(username + " joined; " + participants(numUsers) + ".", true));
socket.on("user left", ({ username, numUsers }) => {
  typing.delete(username);
  showTyping();
  add(username + " left; " + participants(numUsers) + ".", true);
});
socket.on("new message", ({ username, message }) => {
  typing.delete(username);
  showTyping();
  add(username + ": " + message);
});
socket.on("typing", ({ username }) => { typing.add(username); showTyping(); });
socket.on("stop typing", ({ username }) => { typing.delete(username); showTyping(); });
socket.on("tick", ({ count }) => ($("typing").title = "server tick " + count));
socket.on("disconnect", (reason) => add("Disconnected (" + reason + "); reconnecting…", true));
// A restarted worker has a new session for us: join again under the same name.
socket.io.on("reconnect", () => me && socket.emit("add user", me));

let typingTimer = null;
$("text").addEventListener("input", () => {
  if (!typingTimer) socket.emit("typing");
  clearTimeout(typingTimer);
  typingTimer = setTimeout(() => { socket.emit("stop typing"); typingTimer = null; }, 1000);
});
$("send").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  socket.emit("new message", text);
  add(me + ": " + text);
  $("text").value = "";
});
</script>
</body>
</html>
`;

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
