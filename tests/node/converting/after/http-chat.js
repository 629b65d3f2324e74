// A chat shaped like socket.io's "get started" tutorial, on node:http (no express): the
// page at /, and every `chat message` goes to everyone. docs/converting-node.md shows the
// diff from converting/before/ (one process) to converting/after/ (sticky-dispatch workers).
const { createServer } = require('node:http');
const { Server } = require('socket.io');
const { createClient } = require('redis');
const { createAdapter } = require('@socket.io/redis-adapter');
const sticky = require('sticky-dispatch');

const page = `<!doctype html>
<html>
<head><meta charset="utf-8"><title>Socket.IO chat</title></head>
<body>
<ul id="messages"></ul>
<form id="form"><input id="input" autocomplete="off"><button>Send</button></form>
<script src="/socket.io/socket.io.js"></script>
<script>
  const socket = io();
  const form = document.getElementById('form');
  const input = document.getElementById('input');
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    if (input.value) {
      socket.emit('chat message', input.value);
      input.value = '';
    }
  });
  socket.on('chat message', (msg) => {
    const item = document.createElement('li');
    item.textContent = msg;
    document.getElementById('messages').appendChild(item);
  });
</script>
</body>
</html>
`;

const server = createServer((req, res) => {
  if (req.url === '/') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(page);
  } else {
    res.writeHead(404);
    res.end();
  }
});
const io = new Server(server);
const pubClient = createClient({ url: process.env.REDIS_URL });
const subClient = pubClient.duplicate();

io.on('connection', (socket) => {
  socket.on('chat message', (msg) => {
    io.emit('chat message', msg);
  });
});

Promise.all([pubClient.connect(), subClient.connect()]).then(() => {
  io.adapter(createAdapter(pubClient, subClient));
  sticky.listen(server).on('drain', () => io.close());
});
