// Package fleettest holds the live tests of fleet mode: three brokers
// (broker.Start) on one real Vault, sharing their security state on a
// 3-node NATS JetStream cluster, attacked and operated from outside over
// MQTT and the admin API. It has no code of its own.
package fleettest
