'use strict';
// A plain HTTP app behind `sticky-dispatch node-worker`, speaking the bridge's side of
// Node's IPC channel by hand (no package), for tests/node_worker.rs. It answers like the
// demo worker, so tests/common's Answer parses it:
//   worker=<STICKY_DISPATCH_INDEX> pid=<pid> client=<address>
//   listener=<name> local=<address:port>
// Environment: APP_READY_DELAY_MS delays readiness (the app "loads" that long);
// APP_PACKAGE=1 serves through the npm package in node/ (`listen(server)`, its drain)
// instead of the hand-written channel code below.
const http = require('http');
const path = require('path');

const index = process.env.STICKY_DISPATCH_INDEX;
const readyDelay = Number(process.env.APP_READY_DELAY_MS || 0);

if (process.env.APP_PACKAGE === '1') {
  const sticky = require(path.join(__dirname, '..', '..', '..', 'node'));
  const packaged = http.createServer((req, res) => {
    const info = sticky.connectionInfo(req.socket) || {};
    res.end(
      `worker=${sticky.index} pid=${process.pid} client=${req.socket.remoteAddress}\n` +
        `listener=${info.listener} local=${req.socket.localAddress}:${req.socket.localPort}\n`,
    );
  });
  setTimeout(() => {
    console.error(`app ${process.pid}: ready worker=${sticky.index} (package)`);
    sticky.listen(packaged, { drainTimeout: 5000 }).on('drain', (reason) => {
      console.error(`app ${process.pid}: drained (${reason}), ${packaged._connections} connections open`);
    });
  }, readyDelay);
  return;
}

const server = http.createServer((req, res) => {
  const info = req.socket.stickyDispatch || {};
  // The dispatcher's view (behind PROXY protocol, the client in the header); else the
  // socket's own.
  const client = info.peer ? info.peer.address : req.socket.remoteAddress;
  const local = info.local
    ? `${info.local.address}:${info.local.port}`
    : `${req.socket.localAddress}:${req.socket.localPort}`;
  if (draining) res.setHeader('Connection', 'close');
  res.end(`worker=${index} pid=${process.pid} client=${client}\nlistener=${info.listener} local=${local}\n`);
});

// Connections handed to us and not closed yet. On `drain` we wait for them rather than
// call server.close(): since Node 19 that also closes "idle" connections, and a connection
// handed over whose request has not been read yet counts as idle: its client would get a
// reset.
let open = 0;
let draining = false;
const exitWhenDone = () => {
  if (draining && open === 0) process.exit(0);
};

process.on('message', (message, socket) => {
  if (!message || typeof message !== 'object') return;
  if (message.stickyDispatch === 'connection' && socket) {
    socket.stickyDispatch = message;
    open += 1;
    socket.on('close', () => {
      open -= 1;
      exitWhenDone();
    });
    server.emit('connection', socket);
  } else if (message.stickyDispatch === 'sync') {
    // A dispatcher took the channel: it reads nothing before this answer.
    process.send({ stickyDispatch: 'synced', id: message.id, draining: stopping });
  } else if (message.stickyDispatch === 'drain') {
    // Nothing more will come: finish the open connections, then exit (a silent client is
    // not waited for longer than 5 s).
    console.error(`app ${process.pid}: drained, ${open} connections open`);
    draining = true;
    setTimeout(() => process.exit(0), 5000).unref();
    exitWhenDone();
  }
});

// systemd's SIGTERM reaches us too (and the bridge passes its own on): ask the
// dispatcher to drain, and wait for its `drain`.
let stopping = false;
process.on('SIGTERM', () => {
  stopping = true;
  process.send({ stickyDispatch: 'drain-request' });
});

setTimeout(() => {
  console.error(`app ${process.pid}: ready worker=${index}`);
  process.send({ stickyDispatch: 'ready' });
}, readyDelay);
