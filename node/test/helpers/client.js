'use strict';
// A small HTTP(S) client for the tests: one request, the whole answer.
const http = require('node:http');
const https = require('node:https');

/**
 * GET http(s)://127.0.0.1:port/path (from `localAddress`, say 127.0.0.7, if given). Resolves
 * with {status, headers, body, json}; rejects on a connection error (e.g. the connection
 * closed without an answer).
 */
function get(port, path = '/', { agent, ca, headers, localAddress } = {}) {
  const mod = ca ? https : http;
  return new Promise((resolve, reject) => {
    const req = mod.get(
      // agent false: a new connection per request (Node's global agent keeps them alive).
      { host: '127.0.0.1', port, path, agent: agent ?? false, ca, servername: ca ? 'localhost' : undefined, headers, localAddress },
      (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (d) => (body += d));
        res.on('end', () => {
          let json = null;
          try {
            json = JSON.parse(body);
          } catch {
            // not JSON: the caller looks at body
          }
          resolve({ status: res.statusCode, headers: res.headers, body, json });
        });
        res.on('error', reject);
      },
    );
    req.on('error', reject);
  });
}

module.exports = { get };
