'use strict';
// Test app: two servers in one process, each for one dispatcher listener.
const http = require('node:http');
const sticky = require('../..');

sticky.listen(http.createServer((req, res) => res.end('web')), { listener: 'web' });
sticky.listen(http.createServer((req, res) => res.end('api')), { listener: 'api' });
