'use strict';
// Plays the dispatcher's side of lanes for helpers/fake-channel.js's receivedLanes():
// listens on `sockets` sockets of 127.0.0.1 (backlog `backlog`) and sends each to its
// parent `copies` times as a raw TCP handle, which Node writes as the dispatcher writes a
// lane, {"cmd":"NODE_HANDLE","type":"net.Native",...} with the socket's fd. Then closes its
// own fds and exits: the parent holds the only ones, and nothing else accepts on them.
//   node lane-source.js SOCKETS COPIES BACKLOG
const net = require('node:net');
const { once } = require('node:events');

async function main() {
  const [sockets, copies, backlog] = process.argv.slice(2).map(Number);
  const servers = [];
  for (let i = 0; i < sockets; i++) {
    const server = net.createServer();
    server.listen({ port: 0, host: '127.0.0.1', backlog });
    await once(server, 'listening');
    servers.push(server);
  }
  const written = [];
  for (const server of servers) {
    for (let c = 0; c < copies; c++) {
      // Written once the callback runs: the fd is in the channel then, ours may close.
      written.push(new Promise((resolve) => process.send({ port: server.address().port }, server._handle, resolve)));
    }
  }
  await Promise.all(written);
  for (const server of servers) server.close();
  process.disconnect();
}

main();
