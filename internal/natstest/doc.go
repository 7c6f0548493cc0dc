// Package natstest makes the JetStream clusters of this project's tests
// elect their Raft leaders within 2 to 4 s instead of 4 to 9 s. Import
// it only from tests, and call FastRaft in TestMain, before any NATS
// server starts.
//
// nats-server times its Raft groups (the JetStream meta group, every
// replicated stream and KV bucket) with package variables and offers no
// option for them; its own test suite shortens them in an init function
// (server/jetstream_helpers_test.go: elections after 1.5 to 3.5 s, a
// 50 ms heartbeat, quorum lost after 5 s). FastRaft sets the same
// variables, reached by go:linkname, to values near those: a follower
// that hears no heartbeat for 2 to 4 s campaigns (not 4 to 9 s), leaders
// send heartbeats every 100 ms (not 1 s), and a leader steps down 5 s
// after it lost its quorum (not 10 s). The election timeout stays above
// nats-server's tests' 1.5 s: a test process under the race detector on a
// loaded machine can stall a follower that long, and a needless election
// fails a claim that a test expects to pass. Every election, failover and
// quorum loss still happens, through nats-server's own code: only the
// waiting before it is shorter. A nats-server release that
// renames a variable fails the tests' link, loudly; production binaries
// never import this package. M2MGUARD_NATS_RAFT=default keeps nats-server's
// own timers (to compare, or to run a test as production times it).
package natstest
