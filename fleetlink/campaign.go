package fleetlink

import (
	"context"
	"sync"

	"github.com/m2mguard/m2mguard/fleet"
)

// campaignLeaseName is the fleet-wide lease of the credential-change
// campaigns: one broker at a time walks them.
const campaignLeaseName = "campaigns"

// CampaignLease returns the fleet's lease of the credential-change
// campaigns as package campaign's Lease (campaign.Options.Lease): Hold
// waits until this broker holds it and returns a context that ends when
// it is lost. The lease is released at Close. Call it once.
func (l *Link) CampaignLease() (*LeaseHold, error) {
	h := &LeaseHold{changed: make(chan struct{})}
	lease, err := l.f.Lease(campaignLeaseName, fleet.LeaseOptions{OnGain: h.gain, OnLoss: h.lose})
	if err != nil {
		return nil, err
	}
	if !l.addStop(lease.Stop) {
		lease.Stop()
	}
	return h, nil
}

// LeaseHold follows a fleet lease for work that runs while it is held.
type LeaseHold struct {
	mu      sync.Mutex
	held    context.Context // while the lease is held; nil otherwise
	cancel  context.CancelFunc
	changed chan struct{} // closed and replaced when the lease is gained
}

func (h *LeaseHold) gain() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.held != nil {
		return
	}
	h.held, h.cancel = context.WithCancel(context.Background())
	close(h.changed)
	h.changed = make(chan struct{})
}

func (h *LeaseHold) lose() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cancel != nil {
		h.cancel()
	}
	h.held, h.cancel = nil, nil
}

// Hold blocks until the lease is held, or ctx ends, and returns a context
// that ends when the lease is lost or ctx ends.
func (h *LeaseHold) Hold(ctx context.Context) (context.Context, error) {
	for {
		h.mu.Lock()
		held, changed := h.held, h.changed
		h.mu.Unlock()
		if held != nil {
			hctx, cancel := context.WithCancel(ctx)
			stop := context.AfterFunc(held, cancel)
			context.AfterFunc(hctx, func() { stop() })
			return hctx, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-changed:
		}
	}
}
