'use strict';
// What index.js keeps for its own tests (not the API): the shared facts, WorkerSession,
// StickyServer. Loading index.js installs nothing: only listen() does.
module.exports = require('../..')[Symbol.for('sticky-dispatch.internals')];
