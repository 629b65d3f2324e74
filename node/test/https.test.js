'use strict';
// https with TLS terminated in the worker: the TLSSocket that https makes of the handed
// connection must report the client from the message too.
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { execFileSync } = require('node:child_process');
const { FakeBridge } = require('./helpers/fake-bridge');
const { get } = require('./helpers/client');

const APP = path.join(__dirname, 'apps', 'http-app.js');

/** A self-signed certificate for localhost and 127.0.0.1, made now with openssl. */
function makeCertificate(t) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sticky-dispatch-tls-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const key = path.join(dir, 'key.pem');
  const cert = path.join(dir, 'cert.pem');
  execFileSync(
    'openssl',
    ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '1',
      '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1'],
    { stdio: 'ignore' },
  );
  return { key, cert, ca: fs.readFileSync(cert) };
}

function haveOpenssl() {
  try {
    execFileSync('openssl', ['version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

test('https: the TLSSocket reports the client from the message', async (t) => {
  // Fails rather than skips: a test that passes without testing hides a missing tool.
  assert.ok(haveOpenssl(), 'openssl not found: install it (Debian: apt-get install openssl) to make the test certificate');
  const { key, cert, ca } = makeCertificate(t);
  const bridge = new FakeBridge(APP, { env: { APP_TLS_KEY: key, APP_TLS_CERT: cert } });
  t.after(() => bridge.close());
  await bridge.message((m) => m.stickyDispatch === 'ready');
  const port = await bridge.listen();
  const res = await get(port, '/', { ca });
  assert.equal(res.status, 200);
  assert.equal(res.json.encrypted, true, 'served over TLS');
  assert.equal(res.json.remoteAddress, '198.51.100.1');
  assert.equal(res.json.remotePort, 40001);
  assert.equal(res.json.remoteFamily, 'IPv4');
  assert.equal(res.json.localPort, port);
  assert.equal(res.json.info && res.json.info.seq, 1, 'connectionInfo() finds the TLSSocket');

  // The drain counts TLS connections too: an in-flight request finishes, then exit 0.
  const slow = get(port, '/slow', { ca });
  await bridge.message((m) => m.app === 'slow-started');
  bridge.drain();
  const last = await slow;
  assert.equal(last.status, 200);
  assert.equal(last.json.remoteAddress, '198.51.100.2');
  assert.deepEqual(await bridge.exited, { code: 0, signal: null });
});
