// A chat shaped like socket.io's chat example, on express: a nickname, `add user`,
// `new message`, `typing`, and how many participants there are. docs/converting-node.md shows the
// diff from converting/before/ (one process) to converting/after/ (sticky-dispatch workers).
const express = require('express');
const { createServer } = require('node:http');
const { Server } = require('socket.io');
const { createClient } = require('redis');
const { createAdapter } = require('@socket.io/redis-adapter');
const sticky = require('sticky-dispatch');

const page = `<!doctype html>
<html>
<head><meta charset="utf-8"><title>Socket.IO chat</title></head>
<body>
<form id="login"><input id="name" placeholder="Nickname" autocomplete="off"><button>Join</button></form>
<ul id="log"></ul>
<form id="send" hidden><input id="text" autocomplete="off"><button>Send</button></form>
<script src="/socket.io/socket.io.js"></script>
<script>
  const socket = io();
  let me = '';
  const log = (text) => {
    const item = document.createElement('li');
    item.textContent = text;
    document.getElementById('log').appendChild(item);
  };
  const count = (n) => (n === 1 ? 'there is 1 participant' : 'there are ' + n + ' participants');
  document.getElementById('login').addEventListener('submit', (e) => {
    e.preventDefault();
    me = document.getElementById('name').value.trim();
    if (me) socket.emit('add user', me);
  });
  document.getElementById('send').addEventListener('submit', (e) => {
    e.preventDefault();
    const input = document.getElementById('text');
    if (input.value) {
      socket.emit('new message', input.value);
      log(me + ': ' + input.value);
      input.value = '';
    }
  });
  socket.on('login', (data) => {
    document.getElementById('login').hidden = true;
    document.getElementById('send').hidden = false;
    log('Welcome, ' + count(data.numUsers));
  });
  socket.on('new message', (data) => log(data.username + ': ' + data.message));
  socket.on('user joined', (data) => log(data.username + ' joined, ' + count(data.numUsers)));
  socket.on('user left', (data) => log(data.username + ' left, ' + count(data.numUsers)));
</script>
</body>
</html>
`;

const app = express();
const server = createServer(app);
const io = new Server(server);
const pubClient = createClient({ url: process.env.REDIS_URL });
const subClient = pubClient.duplicate();

app.get('/', (req, res) => {
  res.send(page);
});

io.on('connection', (socket) => {
  let addedUser = false;

  socket.on('add user', async (username) => {
    if (addedUser) return;
    addedUser = true;
    socket.username = username;
    const numUsers = await pubClient.incr('numUsers');
    socket.emit('login', { numUsers });
    socket.broadcast.emit('user joined', { username, numUsers });
  });

  socket.on('new message', (message) => {
    socket.broadcast.emit('new message', { username: socket.username, message });
  });

  socket.on('typing', () => {
    socket.broadcast.emit('typing', { username: socket.username });
  });

  socket.on('stop typing', () => {
    socket.broadcast.emit('stop typing', { username: socket.username });
  });

  socket.on('disconnect', async () => {
    if (!addedUser) return;
    const numUsers = await pubClient.decr('numUsers');
    socket.broadcast.emit('user left', { username: socket.username, numUsers });
  });
});

Promise.all([pubClient.connect(), subClient.connect()]).then(() => {
  io.adapter(createAdapter(pubClient, subClient));
  sticky.listen(server).on('drain', () => io.close());
});
