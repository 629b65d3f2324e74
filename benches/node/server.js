// The same trivial http app served four ways, for bench.js:
//
//   node server.js sticky-cluster   sticky-cluster 0.3.5: a master hashes the client IP
//   node server.js sticky-session   sticky-session 1.1.2: the same, its own hash
//   node server.js cluster-none     Node's cluster with SCHED_NONE: the workers accept on
//                                   the shared socket themselves (kernel hand-off, not sticky)
//   node server.js app              one worker for sticky-dispatch:
//       sticky-dispatch --listen ADDR --workers 4 -- sticky-dispatch node-worker -- node server.js app
//
// PORT (default 18380) and WORKERS (default 4) set the port and the worker count. Every
// worker prints `ready pid=<pid>` once it serves: bench.js waits for those lines and
// kills one of those pids in its kill -9 run.
'use strict';

const cluster = require('node:cluster');
const http = require('node:http');
const path = require('node:path');

const variant = process.argv[2];
const port = Number(process.env.PORT || 18380);
const workers = Number(process.env.WORKERS || 4);

function app(index) {
  return http.createServer((req, res) => {
    res.setHeader('content-type', 'text/plain');
    res.end(`hello from worker ${index} pid=${process.pid}\n`);
  });
}

function ready() {
  console.log(`ready pid=${process.pid}`);
}

switch (variant) {
  case 'sticky-cluster': {
    require('sticky-cluster')(
      (serve) => {
        const server = app(process.env.stickycluster_worker_index);
        server.once('listening', ready);
        serve(server);
      },
      { concurrency: workers, port },
    );
    break;
  }
  case 'sticky-session': {
    const sticky = require('sticky-session');
    const server = app(cluster.isPrimary ? '-' : cluster.worker.id);
    // In a worker, listen() installs its message handler synchronously: it serves from here.
    if (sticky.listen(server, port, { workers })) ready();
    break;
  }
  case 'cluster-none': {
    if (cluster.isPrimary) {
      // Set before the first fork: each worker then accepts on the shared socket itself.
      cluster.schedulingPolicy = cluster.SCHED_NONE;
      const fork = () => cluster.fork().on('exit', fork);
      for (let i = 0; i < workers; i++) fork();
    } else {
      const server = app(cluster.worker.id);
      server.once('listening', ready);
      server.listen(port);
    }
    break;
  }
  case 'app': {
    const sticky = require(path.join(__dirname, '..', '..', 'node'));
    const server = app(sticky.index);
    server.once('listening', ready);
    sticky.listen(server);
    break;
  }
  default:
    console.error('usage: node server.js sticky-cluster|sticky-session|cluster-none|app');
    process.exit(2);
}
