package fleettest

import (
	"fmt"
	"testing"
	"time"

	"github.com/m2mguard/m2mguard/broker"
	"github.com/m2mguard/m2mguard/internal/freeport"
)

// fleetEnabled: the brokers run in fleet mode.
const fleetEnabled = true

// natsUser and natsPassword authenticate the brokers to their NATS nodes.
const (
	natsUser      = "m2mguard"
	natsPassword  = "fleet-test-nats-password-5e1d"
	routeUser     = "route"
	routePassword = "fleet-test-route-password-77a0"
)

// fleetMode configures n brokers in fleet mode, each with an embedded NATS
// node routed to the others' (a 3-node JetStream cluster), on loopback.
func fleetMode(t *testing.T, n int) func(i int, cfg *broker.Config) {
	ports := freeport.Ports(t, n)
	var routes []string
	for _, p := range ports {
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", p))
	}
	return func(i int, cfg *broker.Config) {
		c := &cfg.Cluster
		c.BrokerID = fmt.Sprintf("broker%d", i+1)
		c.EmbeddedNATS = true
		c.Embedded.Listen = "127.0.0.1:0"
		c.Embedded.ClusterListen = fmt.Sprintf("127.0.0.1:%d", ports[i])
		c.Embedded.Routes = routes
		c.Embedded.RouteUser, c.Embedded.RoutePassword = routeUser, routePassword
		c.NATSUser, c.NATSPassword = natsUser, natsPassword
		c.Heartbeat = 500 * time.Millisecond
	}
}
