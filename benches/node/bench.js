// Benchmark: new connections per second, and CPU per connection of the dispatching
// processes, for Node sticky-session masters and sticky-dispatch; then kill -9 of one
// worker under load. See README.md beside this file.
//
//   node benches/node/bench.js [--variants a,b,c,d] [--concurrency 1,32,128] [--seconds 3]
//        [--workers 4] [--addresses 256] [--port 18380] [--no-kill] [--dispatch-cmd CMD]
//
// Variants: a sticky-cluster 0.3.5, b sticky-session 1.1.2, c Node cluster SCHED_NONE,
// d sticky-dispatch (its command from --dispatch-cmd or NODE_BENCH_DISPATCH_CMD, with
// {port} and {workers} replaced; default below, run from the repository root).
//
// Each connection: connect from one of `addresses` source addresses 127.0.x.y, send one
// `GET / HTTP/1.1` with `Connection: close`, read the whole answer, expect 200.
'use strict';

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');

const ROOT = path.join(__dirname, '..', '..');
const SERVER = path.join(__dirname, 'server.js');
const DEFAULT_DISPATCH_CMD =
  'target/release/sticky-dispatch --listen 127.0.0.1:{port} --workers {workers} -- ' +
  'target/release/sticky-dispatch node-worker -- node benches/node/server.js app';

const VARIANTS = {
  a: { name: 'sticky-cluster 0.3.5', argv: () => [process.execPath, SERVER, 'sticky-cluster'], children: false },
  b: { name: 'sticky-session 1.1.2', argv: () => [process.execPath, SERVER, 'sticky-session'], children: false },
  c: { name: 'cluster SCHED_NONE', argv: () => [process.execPath, SERVER, 'cluster-none'], children: false },
  // The dispatcher and its direct children (the bridges) dispatch; node is their child.
  d: { name: 'sticky-dispatch', argv: (o) => splitCommand(o.dispatchCmd, o), children: true },
  // The same with another build (--baseline-cmd), for before/after pairs in one run.
  e: { name: 'sticky-dispatch (baseline)', argv: (o) => splitCommand(o.baselineCmd, o), children: true },
};

function splitCommand(cmd, o) {
  return cmd.replaceAll('{port}', String(o.port)).replaceAll('{workers}', String(o.workers)).split(/\s+/).filter(Boolean);
}

function parseArgs(argv) {
  const o = {
    variants: ['a', 'b', 'c'],
    concurrency: [1, 32, 128],
    seconds: 3,
    warmup: 0.5,
    workers: 4,
    addresses: 256,
    port: 18380,
    kill: true,
    dispatchCmd: process.env.NODE_BENCH_DISPATCH_CMD || DEFAULT_DISPATCH_CMD,
    baselineCmd: null,
  };
  for (let i = 0; i < argv.length; i++) {
    const value = () => argv[++i];
    switch (argv[i]) {
      case '--variants': o.variants = value().split(','); break;
      case '--concurrency': o.concurrency = value().split(',').map(Number); break;
      case '--seconds': o.seconds = Number(value()); break;
      case '--workers': o.workers = Number(value()); break;
      case '--addresses': o.addresses = Number(value()); break;
      case '--port': o.port = Number(value()); break;
      case '--no-kill': o.kill = false; break;
      case '--dispatch-cmd': o.dispatchCmd = value(); break;
      case '--baseline-cmd': o.baselineCmd = value(); break;
      default:
        console.error(`unknown argument ${argv[i]}`);
        process.exit(2);
    }
  }
  for (const v of o.variants) if (!VARIANTS[v]) throw new Error(`unknown variant ${v}`);
  if (o.variants.includes('e') && !o.baselineCmd) throw new Error('variant e needs --baseline-cmd');
  return o;
}

// --- CPU of processes, from /proc -------------------------------------------------------

const TICK_US = 1e6 / 100; // USER_HZ is 100 on Linux

function cpuTicks(pid) {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
    // Fields after the command name (which may hold spaces): utime is field 14, stime 15.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(fields[11]) + Number(fields[12]);
  } catch {
    return 0; // gone
  }
}

/** Voluntary context switches (sleeps, i.e. wake-ups) of all threads of `pid`. */
function wakeups(pid) {
  try {
    return fs.readdirSync(`/proc/${pid}/task`).reduce((sum, tid) => {
      const status = fs.readFileSync(`/proc/${pid}/task/${tid}/status`, 'latin1');
      return sum + Number(/voluntary_ctxt_switches:\s+(\d+)/.exec(status)[1]);
    }, 0);
  } catch {
    return 0; // gone
  }
}

function childrenOf(pid) {
  try {
    return fs.readFileSync(`/proc/${pid}/task/${pid}/children`, 'latin1').split(' ').filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

// --- The server under test --------------------------------------------------------------

/** Starts a variant; resolves once `workers` workers printed `ready pid=N`. */
function startServer(variant, o) {
  const [cmd, ...args] = variant.argv(o);
  const child = spawn(cmd, args, {
    cwd: ROOT,
    env: { ...process.env, PORT: String(o.port), WORKERS: String(o.workers) },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true, // its own process group: stopped as a whole at the end
  });
  const server = { child, pid: child.pid, workerPids: [], stderr: '', exited: false };
  child.on('exit', () => (server.exited = true));
  child.stderr.setEncoding('utf8').on('data', (d) => (server.stderr = (server.stderr + d).slice(-4000)));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${variant.name}: not ready in 20 s\n${server.stderr}`)), 20000);
    child.on('exit', (code) => reject(new Error(`${variant.name}: exited with ${code}\n${server.stderr}`)));
    let buffer = '';
    child.stdout.setEncoding('utf8').on('data', (d) => {
      buffer += d;
      let nl;
      while ((nl = buffer.indexOf('\n')) >= 0) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 1);
        const m = /^ready pid=(\d+)/.exec(line);
        if (m) server.workerPids.push(Number(m[1]));
        if (server.workerPids.length === o.workers) {
          clearTimeout(timer);
          resolve(server);
        }
      }
    });
  });
}

/** Kills the variant's process group and waits (at most 10 s) until none of it is left,
 *  so that the next variant finds the port free. */
async function stopServer(server) {
  const groupAlive = () => {
    try {
      process.kill(-server.pid, 0);
      return true;
    } catch {
      return false;
    }
  };
  try {
    process.kill(-server.pid, 'SIGKILL');
  } catch {
    // already gone
  }
  for (let i = 0; i < 200 && groupAlive(); i++) await new Promise((r) => setTimeout(r, 50));
}

/** The dispatching processes: the master, and for sticky-dispatch its bridges. */
function dispatchingPids(variant, server) {
  return variant.children ? [server.pid, ...childrenOf(server.pid)] : [server.pid];
}

// --- Load -------------------------------------------------------------------------------

const REQUEST = 'GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n';

function clientAddresses(n) {
  return Array.from({ length: n }, (_, i) => `127.0.${1 + Math.floor(i / 250)}.${1 + (i % 250)}`);
}

/** One connection, one request; resolves true for a complete 200 answer. */
function oneConnection(port, localAddress) {
  return new Promise((resolve) => {
    const socket = net.connect({ host: '127.0.0.1', port, localAddress });
    let head = '';
    let done = false;
    const finish = (ok) => {
      if (done) return;
      done = true;
      socket.destroy();
      resolve(ok);
    };
    socket.setEncoding('latin1');
    socket.setTimeout(5000, () => finish(false));
    socket.on('connect', () => socket.write(REQUEST));
    socket.on('data', (d) => {
      if (head.length < 64) head += d;
    });
    socket.on('end', () => finish(head.startsWith('HTTP/1.1 200')));
    socket.on('error', () => finish(false));
    socket.on('close', () => finish(head.startsWith('HTTP/1.1 200')));
  });
}

/** `concurrency` loops of back-to-back connections for `seconds`; `during` runs at `at` s. */
async function load(o, concurrency, seconds, addresses, during) {
  const counts = { ok: 0, failed: 0 };
  let next = 0;
  const end = Date.now() + seconds * 1000;
  if (during) setTimeout(during.run, during.at * 1000);
  const loop = async () => {
    while (Date.now() < end) {
      const address = addresses[next++ % addresses.length];
      if (await oneConnection(o.port, address)) counts.ok++;
      else counts.failed++;
    }
  };
  await Promise.all(Array.from({ length: concurrency }, loop));
  return counts;
}

async function measure(o, variant, server, concurrency, addresses) {
  await load(o, concurrency, o.warmup, addresses);
  const pids = dispatchingPids(variant, server);
  const before = pids.map(cpuTicks);
  const workersBefore = server.workerPids.map(cpuTicks);
  const wakesBefore = pids.map(wakeups);
  const selfBefore = process.cpuUsage();
  const started = process.hrtime.bigint();
  const counts = await load(o, concurrency, o.seconds, addresses);
  const elapsed = Number(process.hrtime.bigint() - started) / 1e9;
  const spent = pids.map((pid, i) => cpuTicks(pid) - before[i]);
  const wakes = pids.map((pid, i) => wakeups(pid) - wakesBefore[i]).reduce((sum, w) => sum + w, 0);
  const ticks = spent.reduce((sum, t) => sum + t, 0);
  const workerTicks = server.workerPids.reduce((sum, pid, i) => sum + cpuTicks(pid) - workersBefore[i], 0);
  const self = process.cpuUsage(selfBefore);
  const total = counts.ok + counts.failed;
  return {
    concurrency,
    rate: counts.ok / elapsed,
    cpuPerConn: total ? (ticks * TICK_US) / total : NaN,
    // Of which the first process (sticky-dispatch: the dispatcher, without its bridges).
    mainPerConn: total ? (spent[0] * TICK_US) / total : NaN,
    wakesPerConn: total ? wakes / total : NaN,
    loadgenPerConn: total ? (self.user + self.system) / total : NaN,
    // The app's worker processes (the same http app in every variant).
    workersPerConn: total ? (workerTicks * TICK_US) / total : NaN,
    failed: counts.failed,
    total,
  };
}

/** kill -9 one worker one second into a run at concurrency 32. */
async function killRun(o, variant, server, addresses) {
  const victim = server.workerPids[0];
  const counts = await load(o, 32, o.seconds, addresses, {
    at: 1,
    run: () => {
      try {
        process.kill(victim, 'SIGKILL');
      } catch {
        // already gone
      }
    },
  });
  const masterAlive = alive(server.pid) && !server.exited;
  // Does it still serve? One client whose connections all went through the fault.
  const after = masterAlive ? await oneConnection(o.port, '127.0.0.1') : false;
  return { ...counts, masterAlive, servesAfter: after };
}

function pad(text, width) {
  return String(text).padEnd(width);
}

async function main() {
  const o = parseArgs(process.argv.slice(2));
  const addresses = clientAddresses(o.addresses);
  const rows = [];
  const kills = [];
  for (const key of o.variants) {
    const variant = VARIANTS[key];
    process.stderr.write(`== ${key}: ${variant.name}\n`);
    let server;
    try {
      server = await startServer(variant, o);
    } catch (err) {
      console.error(err.message);
      rows.push({ variant: variant.name, error: err.message.split('\n')[0] });
      continue;
    }
    try {
      for (const c of o.concurrency) rows.push({ variant: variant.name, ...(await measure(o, variant, server, c, addresses)) });
      if (o.kill) kills.push({ variant: variant.name, ...(await killRun(o, variant, server, addresses)) });
    } finally {
      await stopServer(server);
    }
  }

  console.log(`\n${o.workers} workers, ${o.addresses} client addresses, ${o.seconds} s per row, one request per connection (Connection: close)\n`);
  console.log(`${pad('variant', 28)}${pad('concurrency', 13)}${pad('conn/s', 10)}${pad('CPU µs/conn', 14)}${pad('(dispatcher)', 14)}${pad('wakes/conn', 12)}${pad('failed', 8)}${pad('load gen µs/conn', 18)}workers µs/conn`);
  for (const r of rows) {
    if (r.error) {
      console.log(`${pad(r.variant, 28)}${r.error}`);
      continue;
    }
    console.log(
      `${pad(r.variant, 28)}${pad(r.concurrency, 13)}${pad(Math.round(r.rate), 10)}${pad(r.cpuPerConn.toFixed(0), 14)}${pad(r.mainPerConn.toFixed(0), 14)}${pad(r.wakesPerConn.toFixed(2), 12)}${pad(`${r.failed}/${r.total}`, 8)}${pad(r.loadgenPerConn.toFixed(0), 18)}${r.workersPerConn.toFixed(0)}`,
    );
  }
  if (kills.length) {
    console.log(`\nkill -9 of one worker 1 s into a ${o.seconds} s run at concurrency 32\n`);
    console.log(`${pad('variant', 28)}${pad('connections', 13)}${pad('failed', 8)}${pad('master alive', 14)}serves after`);
    for (const k of kills) {
      console.log(`${pad(k.variant, 28)}${pad(k.ok + k.failed, 13)}${pad(k.failed, 8)}${pad(k.masterAlive, 14)}${k.servesAfter}`);
    }
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
