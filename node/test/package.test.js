'use strict';
// What `npm pack` ships: the runtime files only, no dependencies.
const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { execFile } = require('node:child_process');
const pkg = require('../package.json');

test('package.json: no runtime dependencies, node >= 18, MIT, types', () => {
  assert.deepEqual(pkg.dependencies ?? {}, {});
  assert.equal(pkg.engines.node, '>=18');
  assert.equal(pkg.license, 'MIT');
  assert.equal(pkg.types, 'index.d.ts');
});

test('npm pack ships index.js, index.d.ts, README.md, LICENSE, package.json', { timeout: 60000 }, async () => {
  const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm';
  const stdout = await new Promise((resolve, reject) =>
    execFile(npm, ['pack', '--dry-run', '--json'], { cwd: path.join(__dirname, '..') }, (err, out) =>
      err ? reject(err) : resolve(out),
    ),
  );
  const [{ files }] = JSON.parse(stdout);
  assert.deepEqual(files.map((f) => f.path).sort(), ['LICENSE', 'README.md', 'index.d.ts', 'index.js', 'package.json']);
});
