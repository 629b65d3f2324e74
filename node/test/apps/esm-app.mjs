// Test app: the package imported from an ES module (named exports through Node's CJS
// interop), serving plain http.
import http from 'node:http';
import { listen, index, connectionInfo } from '../../index.js';
import sticky from '../../index.js';

const server = http.createServer((req, res) => {
  res.setHeader('content-type', 'application/json');
  res.end(
    JSON.stringify({
      remoteAddress: req.socket.remoteAddress,
      info: connectionInfo(req.socket),
      index,
      defaultExportIndex: sticky.index,
    }),
  );
});
listen(server);
