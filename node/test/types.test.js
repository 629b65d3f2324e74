'use strict';
// index.d.ts: a usage file compiles under strict TypeScript, a misuse does not.
const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const fs = require('node:fs');
const { execFile } = require('node:child_process');

const ROOT = path.join(__dirname, '..');
const TSC = path.join(ROOT, 'node_modules', '.bin', 'tsc');

function tsc(args) {
  assert.ok(fs.existsSync(TSC), 'typescript is a devDependency: run `npm ci` in node/ first');
  return new Promise((resolve) => {
    execFile(TSC, args, { cwd: ROOT }, (err, stdout, stderr) => {
      resolve({ code: err ? err.code : 0, output: stdout + stderr });
    });
  });
}

test('the declarations compile with a usage file (strict)', { timeout: 120000 }, async () => {
  const { code, output } = await tsc(['-p', 'test/types']);
  assert.equal(code, 0, output);
});

test('the declarations refuse a misuse', { timeout: 120000 }, async () => {
  const { code, output } = await tsc([
    '--noEmit', '--strict', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--types', 'node',
    'test/types/misuse.ts',
  ]);
  assert.notEqual(code, 0);
  assert.match(output, /misuse\.ts\(5,\d+\).*TS\d+/);
});
