// Package fleet shares the security state of a fleet of m2mguard brokers
// on NATS JetStream, so that several brokers in front of one Vault keep the
// guarantees of a single one: a login token is accepted once in the whole
// fleet, password guesses count fleet-wide, every broker knows which broker
// holds each session, and brokers tell each other of revocations and
// commits. mochi has no clustering and m2mguard has no cluster protocol of
// its own: NATS (github.com/nats-io/nats-server/v2, nats.go; Apache-2.0,
// pure Go) does the distribution. Vault stays the store of record.
//
// # Parts
//
// A broker opens one *Fleet (Open) and uses:
//
//   - Claim: the hook's ReplayGuard (hook.Options.ReplayGuard). A JetStream
//     KV Create on the bucket M2MGUARD_REPLAY, key "<sn>.<nonce as 16 hex
//     digits>", with a TTL of 2 × Skew + ClaimMargin: atomic, one winner in
//     the fleet.
//   - Throttler: the hook's Throttler (hook.Options.Throttler) around its
//     own table (hook.NewThrottleTable); failures and successes go to the
//     other brokers on core NATS in batches, and theirs come back.
//   - Directory: the session directory (ClientID → broker, kind, sn or
//     application, address, protocol, since, epoch) in the bucket
//     M2MGUARD_SESSIONS, with epochs for takeover and a watch.
//   - Bus: events between brokers on the stream M2MGUARD_EVENTS
//     (m2mguard.evt.<kind>, kept 10 minutes): EventRevoke, EventInvalidate,
//     and EventResync after a gap.
//   - Handle, Request, Gather: request/reply on m2mguard.rpc.<broker>.<method>,
//     and scatter/gather over the live brokers (those whose key in
//     M2MGUARD_BROKERS is fresh: each renews it every Heartbeat).
//   - Lease: one holder at a time in the fleet (bucket M2MGUARD_LEASES), for
//     work that runs once per fleet. The fleet itself uses the lease
//     "directory-sweep" to remove the sessions of brokers that are gone.
//
// Close stops every goroutine the Fleet and its parts started and waits
// for them. Metrics (m2mguard_fleet_*) go to Options.Registerer.
//
// # NATS
//
// The fleet runs on an external NATS cluster with JetStream (Options.URLs,
// credentials, TLS), or on a node embedded in each broker (StartNode): N
// brokers, each with a node routed to the others', form one JetStream
// cluster, and the fleet needs no other service. Buckets and the stream
// have 3 replicas (Options.Replicas) on file storage: a claim survives the
// loss of a node and the restart of all of them. Embedded nodes fsync every
// second (NodeOptions.SyncInterval); configure an external cluster's
// sync_interval likewise.
//
// Open refuses a URL off loopback without TLS, and connecting without
// credentials (user and password, token, NKey seed or .creds file) unless
// every URL is on loopback. StartNode refuses a listener off loopback
// without client authentication, and routes off loopback without route
// credentials and mutual TLS. Anyone who can publish on the fleet's
// subjects is trusted as a broker: give the brokers' NATS user the
// m2mguard.> and $KV/$JS subjects and nobody else.
//
// # Starting together
//
// The brokers of a new fleet start together and each creates the same
// buckets and stream. JetStream answers nothing to a request it cannot
// serve yet: any before its meta leader is elected, and an update of a
// stream whose Raft group is still electing its first leader (another
// broker's create came first). So Open asks every 250 ms whether
// JetStream answers, then creates every asset at once, each with a first
// attempt of 250 ms and longer ones after (up to 2 s, for a slow link):
// a broker is up a moment after the cluster can serve it, not after a
// whole attempt per unanswered request. KeyValue, and package
// fleetroute's streams, do the same.
//
// # When NATS is unreachable or has no leader
//
// Claims fail closed. Claim retries for up to ClaimTimeout (2 s, longer
// than a JetStream leader election) and then returns an error wrapping
// ErrUnavailable: the hook refuses the login or control message (MQTT 5
// 0x88 server unavailable) and the terminal tries again later. So no
// replay is ever accepted and no terminal is locked out; a terminal is only
// delayed while the fleet has no quorum. Claims are not answered locally in
// the meantime: nothing guarantees that a terminal keeps reaching the same
// broker during a failover (load balancers re-route, terminals reconnect
// elsewhere), so a local answer could accept a token already accepted by
// another broker. A claim whose answer was lost (stored, then the leader
// failed) is recognised as the broker's own when retried: a genuine login
// is never called a replay.
//
// The throttle goes on locally (no worse than a single broker); events
// published meanwhile are delivered when the broker is back (within 10
// minutes, else an EventResync); Request and Gather fail with ErrTimeout or
// ErrUnknownBroker. Available reports the state, the gauge
// m2mguard_fleet_available follows it, and the events fleet_unavailable
// and fleet_available are logged once per change.
//
// # Consistency
//
// Claims, directory epochs and leases are linearizable (JetStream's Raft:
// a check-and-set on the key's revision). Throttle counts are eventual:
// another broker applies a failure within milliseconds; a success clears
// the pair on every broker, also failures another broker counted a moment
// before. Directory watches and events arrive in the order JetStream
// stored them.
//
// # Nothing secret on the bus
//
// Keys and values carry serial numbers, application names, ClientIDs,
// source addresses, broker ids, times and random tags: never a password,
// key, token, digest or digest input. The test suite logs a terminal in
// through live brokers and scans everything on NATS and in the logs for
// its secrets.
package fleet
