// Compiled (not run) by types.test.js: the declarations describe how the package is used.
import http from 'node:http';
import https from 'node:https';
import type { Socket } from 'node:net';
import * as sticky from '../../index.js';
import { listen, index, connectionInfo, NoBridgeError, type ConnectionInfo, type StickyServer } from '../../index.js';

const server = http.createServer((req, res) => {
  const info: ConnectionInfo | undefined = connectionInfo(req.socket);
  const client: string | undefined = info?.peer?.address;
  res.end(`${client} ${info?.listener} ${index ?? '-'}`);
});

const handle: StickyServer<http.Server> = listen(server, { drainTimeout: 30_000, fallbackPort: process.env.PORT });
const same: http.Server = handle.server;
// seq is null for a connection accepted on a lane: the kernel routed it, not the dispatcher.
handle.on('connection', (socket: Socket, info: ConnectionInfo) => socket.setNoDelay(info.seq === null || info.seq > 0));
handle.on('drain', (reason) => console.log(reason === 'bridge', same.listening));
handle.once('close', () => undefined);
void handle.listening.then(() => handle.close()).then(() => handle.closed);

const secure = https.createServer({});
listen(secure, { listener: 'tls', exit: false }, () => undefined);
listen(http.createServer(), () => undefined);

const n: number | null = sticky.workerIndex();
const mode: 'bridge' | 'fallback' = handle.mode;
try {
  listen(server);
} catch (err) {
  if (err instanceof NoBridgeError) console.log(err.code === 'ERR_STICKY_DISPATCH_NO_BRIDGE', n, mode);
}
