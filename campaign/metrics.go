package campaign

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/m2mguard/m2mguard/keysvc"
)

var (
	terminalsDesc = prometheus.NewDesc("m2mguard_campaign_terminals",
		"Terminals of each campaign this broker runs, by outcome (waiting, delivered, committed, expired, busy, inactive, failed); a campaign's series go once it is finished.",
		[]string{"campaign", "outcome"}, nil)
	campaignsDesc = prometheus.NewDesc("m2mguard_campaigns",
		"Campaigns this broker runs, by state (running: starting changes; tracking: following them; cancelled: not starting any more).",
		[]string{"state"}, nil)
)

// Describe implements prometheus.Collector: register the Runner with the
// broker's registry to export its campaigns.
func (r *Runner) Describe(ch chan<- *prometheus.Desc) {
	ch <- terminalsDesc
	ch <- campaignsDesc
}

// Collect implements prometheus.Collector: the counts of every campaign
// in memory (those not finished), copied under the runner's lock and sent
// after it.
func (r *Runner) Collect(ch chan<- prometheus.Metric) {
	states := map[keysvc.CampaignState]int{keysvc.CampaignRunning: 0, keysvc.CampaignTracking: 0, keysvc.CampaignCancelled: 0}
	counts := map[string]keysvc.CampaignCounts{}
	r.mu.Lock()
	for id, a := range r.active {
		if a.c.Finished.IsZero() {
			states[a.c.State]++
			counts[id] = a.c.Counts
		}
	}
	r.mu.Unlock()
	for id, c := range counts {
		for _, o := range keysvc.Outcomes() {
			ch <- prometheus.MustNewConstMetric(terminalsDesc, prometheus.GaugeValue, float64(c.Of(o)), id, string(o))
		}
	}
	for st, n := range states {
		ch <- prometheus.MustNewConstMetric(campaignsDesc, prometheus.GaugeValue, float64(n), string(st))
	}
}
