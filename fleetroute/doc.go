// Package fleetroute routes MQTT messages between the brokers of an
// m2mguard fleet (package fleet) on NATS JetStream, so that an application
// connected to one broker receives what terminals publish through another,
// and its downlinks reach a terminal connected to any broker (type
// Downlinks documents that half: stream M2MGUARD_DOWNLINKS, one subject
// per terminal, drained by the broker holding the terminal's session).
// mochi has no clustering: each broker is a mochi server of its own, and
// this package, as mochi hooks, carries messages between them.
//
// # Uplinks
//
// Uplinks (NewUplinks) is added to each broker's mochi server after the
// m2mguard hook and the session-store hook. Its OnPublish sees a
// publish of a real client (never one of mochi's inline client) on an
// uplink topic, m2m/<sn>/up/..., after the m2mguard hook has opened the
// envelope: the payload is the plaintext the broker's own applications
// receive. It publishes the message on the stream M2MGUARD_UPLINKS with
// the headers M2M-Origin (the broker id), M2M-QoS and M2M-Retain, and lets
// mochi deliver it locally as usual. Each broker has a durable consumer
// of the stream ("uplinks-<broker id>", explicit acknowledgement, at most
// MaxAckPending unacknowledged) that skips the messages of its own origin
// and injects the others into its mochi server with server.Publish (the
// inline client): the original topic, QoS and retain flag. mochi checks
// every recipient's ACL (the m2mguard hook's), so each application still
// receives only what its reach allows. Injected messages are inline
// publishes, which OnPublish ignores: nothing is routed twice.
//
// Wills, which mochi sends without OnPublish, are forwarded from
// OnWillSent. A retained uplink is also published on the stream
// M2MGUARD_RETAINED (one message per subject: the last); an empty retained
// payload clears the topic's retained message on every broker. Start loads
// that set into mochi's retained messages, so a broker that starts later,
// or restarts, has the fleet's current retained uplinks (without
// delivering them to anyone; the session store is not told, the set is
// loaded again at every start). Clients that subscribe between mochi's
// Serve and the end of that load may miss a retained message.
//
// # Subjects
//
// A topic's subject is a prefix (m2mguard.up. or m2mguard.ret.) followed
// by one token per topic level, escaped with fleet.EscapeKey: ASCII
// letters, digits and '-' stay, every other byte becomes '_' and two
// upper-case hex digits; an empty level is the token "_", which EscapeKey
// never writes. m2m/A1/up/t/x.y is m2mguard.up.m2m.A1.up.t.x_2Ey.
// TopicSubject and SubjectTopic convert, refusing what the other cannot
// have produced; a topic whose subject would exceed MaxSubject is
// delivered on its own broker only (counted as a topic failure).
//
// # Guarantees
//
// QoS 1 and 2: OnPublish returns only after JetStream has acknowledged the
// message (retried through a leader election for at most AckTimeout), and
// mochi acknowledges the publish to the client only after OnPublish. So a
// message a terminal saw acknowledged is in the stream, replicated, even if
// its broker dies the next moment: at least once across brokers. If
// JetStream does not acknowledge in time the publish is refused: no PUBACK,
// nothing delivered locally, and the client is disconnected (MQTT 5:
// DISCONNECT 0x89 server busy; 3.1.1 has no server DISCONNECT, the
// connection just closes; a client's will is then sent). The client sends
// the message again when it is back (the reference client returns
// ErrSessionEnded from Publish, and its caller publishes again, in a new
// envelope: the old one was sealed under the ended session's key). mochi
// offers nothing better: packets.CodeSuccessIgnore would acknowledge and
// drop the message (lost), packets.ErrRejectPacket alone leaves a QoS 1
// sender waiting for a PUBACK that never comes, and any other error
// publishes the packet under 3.1.1 anyway (and panics under MQTT 5 if it
// wraps a reason code).
//
// QoS 0: published on core NATS without waiting (the stream stores what
// reaches it) and delivered locally whatever happens: at most once.
//
// Each broker's consumer acknowledges a message after it has injected it
// into its server. In steady state every application receives each uplink
// once, from its own broker. After a broker restarts, its consumer
// delivers what it had not acknowledged and what was published meanwhile
// (within MaxAge, and MaxBytes: the oldest messages go first); a few
// messages injected but not yet acknowledged when it stopped may come
// twice. So may the few whose acknowledgement was in flight when a NATS
// node stopped that led the broker's consumer: JetStream delivers them
// again after 10 s (the consumer's AckWait). Injection is in the stream's order, so the uplinks of one
// terminal arrive in the order its broker stored them. A consumer unused
// for MaxAge (its broker gone) is removed by JetStream; a broker first
// created, or back after that, receives only new messages.
//
// # Not across brokers
//
// Shared subscriptions ($share/...) deliver a message once per broker,
// not once per fleet. MQTT 5 properties of a publish (user properties,
// content type, message expiry, response topic) are not carried: an
// application on another broker receives topic, payload, QoS and retain
// flag. A message larger than NATS's max_payload (1 MiB by default, less
// the subject and headers) is delivered on its own broker only, counted
// as a too-large failure: refusing it would have its client send it again
// forever. Keep mqtt.max_packet_size below max_payload.
//
// # Security
//
// Uplinks cross NATS and rest in JetStream in plaintext (as applications
// receive them), for MaxAge. NATS's TLS and authentication protect them
// on the wire, and only the brokers' NATS user may use the m2mguard.>
// subjects (package fleet): whoever may read m2mguard.up.> reads every
// terminal's data, whoever may publish there injects data as if a
// terminal had sent it. At rest only JetStream's own encryption protects
// them (an external cluster's jetstream cipher; the embedded node has no
// such option: put its store on an encrypted volume). The receiving
// broker injects only uplink topics and mochi applies each recipient's
// ACL to them.
package fleetroute
