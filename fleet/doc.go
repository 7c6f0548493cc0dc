// Package fleet shares the security state of a fleet of m2mguard brokers
// on NATS JetStream, so that several brokers in front of one Vault keep
// every guarantee of a single one.
package fleet
