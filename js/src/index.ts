/**
 * Tern's TypeScript SDK for browsers and Node (≥ 20): see js/README.md.
 * @module
 */
export { Client, Subscription, TernError } from './client.js';
export type {
  Ack,
  ClientEvents,
  ClientOptions,
  ConnectionInfo,
  ConnectionState,
  Discontinuity,
  HistoryPage,
  HistoryQuery,
  Limits,
  Listener,
  PublishOptions,
  StateChange,
  SubscribeOptions,
  SubscriptionEvents,
} from './client.js';
export type {
  ErrorCode,
  Int64,
  Member,
  Message,
  OriginPosition,
  Payload,
  Position,
  PresenceAction,
  PresenceEvent,
} from './codec.js';
export { ERROR_CODES, errorCode } from './codec.js';
export { backoffDelay, type Backoff } from './backoff.js';
export { rank, regions, type Probe, type Region } from './nearest.js';
export type { TransportKind, WebSocketCtor } from './transport.js';
