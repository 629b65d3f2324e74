'use strict';
// The repository's vector files (tests/vectors/), which the tests check the package
// against. The package never reads them: they are not in it.
const fs = require('node:fs');
const path = require('node:path');

const DIR = path.join(__dirname, '..', '..', '..', 'tests', 'vectors');

/** tests/vectors/<name>, parsed; throws (the test fails) when it is missing. */
function readVectors(name) {
  const file = path.join(DIR, name);
  if (!fs.existsSync(file)) {
    throw new Error(`${file} is missing: the package's tests run from a sticky-dispatch checkout`);
  }
  return JSON.parse(fs.readFileSync(file, 'utf8'));
}

module.exports = { readVectors, DIR };
