'use strict';
// Test app: express behind sticky-dispatch; req.ip is what express makes of the socket.
const http = require('node:http');
const express = require('express');
const sticky = require('../..');

const app = express();
app.get('/', (req, res) => {
  res.json({ ip: req.ip, remoteAddress: req.socket.remoteAddress, index: sticky.index });
});
sticky.listen(http.createServer(app));
