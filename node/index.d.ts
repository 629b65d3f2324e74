// Type declarations for sticky-dispatch (the Node.js package). See README.md.

import type { EventEmitter } from 'node:events';
import type { Server, Socket } from 'node:net';

/** An address as the dispatcher reports it (Node's convention for `family`). */
export interface Address {
  readonly address: string;
  readonly port: number;
  readonly family: 'IPv4' | 'IPv6';
}

/**
 * What the dispatcher said about one connection when it handed it to this process, or,
 * for a connection this process accepted on one of its lanes (the kernel routed it here),
 * the socket's own addresses.
 */
export interface ConnectionInfo {
  /**
   * The dispatcher's sequence number of this connection on this process's IPC channel,
   * from 1; null for a connection accepted on a lane.
   */
  readonly seq: number | null;
  /** The real client; null when the dispatcher had no address for it. */
  readonly peer: Address | null;
  /** The address the client reached; null when unknown. */
  readonly local: Address | null;
  /** The name of the dispatcher listener that accepted it (or whose lane it came on). */
  readonly listener: string | null;
}

export interface ListenOptions {
  /**
   * How long, in milliseconds, the drain may take before open connections are cut:
   * from SIGTERM (or the dispatcher's drain) to exit. Default 30000. The process uses the
   * largest value given to any listen() call.
   */
  drainTimeout?: number;
  /**
   * The dispatcher listener whose connections this server takes (for several servers in
   * one process, e.g. http and https). Default: every connection no other server takes.
   */
  listener?: string | null;
  /**
   * Without the bridge, listen on this port directly (not sticky) instead of throwing a
   * NoBridgeError. A numeric string is accepted, e.g. `process.env.PORT`.
   */
  fallbackPort?: number | string | null;
  /** The host for fallbackPort. Default: Node's default (all addresses). */
  fallbackHost?: string;
  /**
   * Exit (with process.exitCode, 0 by default) once drained. Default true. With false,
   * the package lets go of the IPC channel and the app exits by itself, e.g. after
   * `await sticky.closed` and its own clean-up.
   */
  exit?: boolean;
}

export interface StickyServer<S extends Server = Server> extends EventEmitter {
  readonly server: S;
  readonly listener: string | null;
  /** 'fallback' when listening on fallbackPort without the bridge. */
  readonly mode: 'bridge' | 'fallback';
  /** True from the start of the drain on. */
  readonly draining: boolean;
  /** Resolves once the server is serving (ready was sent to the bridge). */
  readonly listening: Promise<void>;
  /** Resolves once the drain is over (before the process exits). */
  readonly closed: Promise<void>;
  /** Stops the process as SIGTERM does; resolves when drained. */
  close(): Promise<void>;

  on(event: 'connection', listener: (socket: Socket, info: ConnectionInfo) => void): this;
  /**
   * 'drain': no more connections will come. reason 'bridge': sticky-dispatch said so (the
   * dispatcher, or the bridge when no dispatcher is connected); 'disconnect': the IPC
   * channel closed; 'timeout': no drain came within drainTimeout of the stop.
   */
  on(event: 'drain', listener: (reason: 'bridge' | 'disconnect' | 'timeout' | undefined) => void): this;
  on(event: 'close', listener: () => void): this;
  on(event: string | symbol, listener: (...args: any[]) => void): this;
  once(event: 'connection', listener: (socket: Socket, info: ConnectionInfo) => void): this;
  once(event: 'drain', listener: (reason: 'bridge' | 'disconnect' | 'timeout' | undefined) => void): this;
  once(event: 'close', listener: () => void): this;
  once(event: string | symbol, listener: (...args: any[]) => void): this;
}

/**
 * Serves `server` with the connections the dispatcher hands to this process (over the IPC
 * channel that `sticky-dispatch node-worker` set up), instead of `server.listen(port)`.
 * Tells the bridge the app is ready, emits 'listening' on the server, drains and exits
 * when sticky-dispatch says so.
 * @throws NoBridgeError when not started by `sticky-dispatch node-worker` and no fallbackPort.
 */
export function listen<S extends Server>(server: S, options?: ListenOptions, callback?: () => void): StickyServer<S>;
export function listen<S extends Server>(server: S, callback: () => void): StickyServer<S>;

/** This worker's index (STICKY_DISPATCH_INDEX), or null outside the bridge. */
export const index: number | null;
export function workerIndex(): number | null;

/** The dispatcher's details of the connection of `socket` (a net.Socket or its TLSSocket). */
export function connectionInfo(socket: Socket): ConnectionInfo | undefined;

export class NoBridgeError extends Error {
  readonly code: 'ERR_STICKY_DISPATCH_NO_BRIDGE';
}

export const DEFAULT_DRAIN_TIMEOUT: number;
