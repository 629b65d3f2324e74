// Must NOT compile (types.test.js checks that tsc refuses it): proves the check can fail.
import http from 'node:http';
import { listen } from '../../index.js';

listen(http.createServer(), { drainTimeout: 'long' });
