'use strict';
// The facts the package shares with the dispatcher are defined once, in index.js, and
// equal tests/vectors/constants.json (which cargo test checks against the Rust side).
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const sticky = require('..');
const internals = require('./helpers/internals');
const { readVectors } = require('./helpers/vectors');

const ROOT = path.join(__dirname, '..');
const constants = readVectors('constants.json');

/** A file of the package, without its comments (documentation may name a fact). */
function code(file) {
  return fs
    .readFileSync(path.join(ROOT, file), 'utf8')
    .replace(/\/\*[\s\S]*?\*\//g, '')
    .replace(/(^|[^:])\/\/.*$/gm, '$1');
}

/** index.js, the test helpers and apps, and the tests: every JavaScript file of node/. */
function packageFiles() {
  const files = ['index.js'];
  for (const dir of ['test', 'test/helpers', 'test/apps']) {
    for (const name of fs.readdirSync(path.join(ROOT, dir)).sort()) {
      if (/\.(c|m)?js$/.test(name)) files.push(`${dir}/${name}`);
    }
  }
  return files;
}

test("the package's copies of the shared facts equal tests/vectors/constants.json", () => {
  assert.equal(internals.ENV_INDEX, constants.env.index, 'the index variable (constants.json env.index)');
  assert.equal(
    internals.DEFAULT_DRAIN_TIMEOUT,
    constants.app_drain_timeout_ms,
    'DEFAULT_DRAIN_TIMEOUT (constants.json app_drain_timeout_ms)',
  );
  assert.equal(sticky.DEFAULT_DRAIN_TIMEOUT, internals.DEFAULT_DRAIN_TIMEOUT, 'the exported DEFAULT_DRAIN_TIMEOUT');
});

test("no other copy: constants.json's names appear in node/'s code only at their one definition", () => {
  const names = [...Object.values(constants.env), constants.default_socket_prefix];
  const found = [];
  for (const file of packageFiles()) {
    const text = code(file);
    for (const name of names) {
      const count = text.split(name).length - 1;
      // index.js defines ENV_INDEX; the socket prefix and the other variables are the
      // bridge's business, not the package's.
      const allowed = file === 'index.js' && name === internals.ENV_INDEX ? 1 : 0;
      if (count !== allowed) found.push(`${file}: ${JSON.stringify(name)} ${count} times (expected ${allowed})`);
    }
    const drain = String(constants.app_drain_timeout_ms);
    const literal = new RegExp(`\\b${drain.replace(/(\d)(?=(\d{3})+$)/g, '$1_?')}\\b`, 'g');
    const count = (text.match(literal) ?? []).length;
    const allowed = file === 'index.js' ? 1 : 0;
    if (count !== allowed) found.push(`${file}: the drain default ${drain} ${count} times (expected ${allowed})`);
  }
  assert.deepEqual(found, [], 'use ENV_INDEX / DEFAULT_DRAIN_TIMEOUT (test/helpers/internals.js) instead');
});

test('the documented drainTimeout default is DEFAULT_DRAIN_TIMEOUT', () => {
  const docs = {
    'index.d.ts': /drain may take[\s\S]*?Default (\d+)\./,
    'index.js': /drainTimeout \(ms, default (\d+)\)/,
    'README.md': /`drainTimeout` \(ms, default (\d+)/,
  };
  for (const [file, pattern] of Object.entries(docs)) {
    const match = fs.readFileSync(path.join(ROOT, file), 'utf8').match(pattern);
    assert.ok(match, `${file}: the drainTimeout default is documented (${pattern})`);
    assert.equal(Number(match[1]), constants.app_drain_timeout_ms, `${file}: the documented drainTimeout default`);
  }
});
