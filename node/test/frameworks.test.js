'use strict';
// express, and the package imported from an ES module.
const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { FakeBridge } = require('./helpers/fake-bridge');
const { get } = require('./helpers/client');

test('express: req.ip is the client from the message', async (t) => {
  const bridge = new FakeBridge(path.join(__dirname, 'apps', 'express-app.js'), { index: '0' });
  t.after(() => bridge.close());
  await bridge.message((m) => m.stickyDispatch === 'ready');
  const port = await bridge.listen();
  const { status, json } = await get(port, '/');
  assert.equal(status, 200);
  assert.deepEqual(json, { ip: '198.51.100.1', remoteAddress: '198.51.100.1', index: 0 });
});

test('ES module: named and default imports', async (t) => {
  const bridge = new FakeBridge(path.join(__dirname, 'apps', 'esm-app.mjs'), { index: '12' });
  t.after(() => bridge.close());
  await bridge.message((m) => m.stickyDispatch === 'ready');
  const port = await bridge.listen();
  const { json } = await get(port, '/');
  assert.equal(json.remoteAddress, '198.51.100.1');
  assert.equal(json.info.listener, 'web');
  assert.equal(json.index, 12);
  assert.equal(json.defaultExportIndex, 12);
});
