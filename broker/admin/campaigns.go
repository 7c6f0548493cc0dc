package admin

import (
	"context"
	"errors"
	"net/http"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/campaign"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

// Campaigns runs fleet-wide credential changes; the broker passes its
// *campaign.Runner.
type Campaigns interface {
	Create(ctx context.Context, r keysvc.CampaignRequest) (*keysvc.Campaign, error)
	Get(ctx context.Context, id string) (*keysvc.Campaign, error)
	List(ctx context.Context) ([]*keysvc.Campaign, error)
	Cancel(ctx context.Context, id string) (*keysvc.Campaign, error)
	Items(ctx context.Context, id string, outcome keysvc.Outcome, after string, limit int) ([]keysvc.CampaignItem, string, error)
}

// maxCampaignBody bounds the body of POST /v1/campaigns: a list of
// keysvc.MaxCampaignList serial numbers fits.
const maxCampaignBody = 4 << 20

// campaignFail answers the errors of the campaign runner, then the
// others as fail does.
func (a *api) campaignFail(w http.ResponseWriter, r *http.Request, err error) {
	switch {
	case errors.Is(err, campaign.ErrRunning):
		writeJSON(w, http.StatusConflict, adminapi.Error{Message: withoutLayer(err.Error())})
	case errors.Is(err, campaign.ErrRate):
		writeJSON(w, http.StatusBadRequest, adminapi.Error{Message: "rate: " + reason(err, campaign.ErrRate) + " (campaigns.max_rate)", Field: "rate"})
	case errors.Is(err, campaign.ErrFinished):
		writeJSON(w, http.StatusConflict, adminapi.Error{Message: "campaign " + r.PathValue("id") + " is finished"})
	case errors.Is(err, keysvc.ErrNotFound):
		writeJSON(w, http.StatusNotFound, adminapi.Error{Message: "campaign " + r.PathValue("id") + " not found"})
	default:
		a.fail(w, r, err)
	}
}

func pathCampaign(r *http.Request) (string, error) {
	id := r.PathValue("id")
	if keysvc.ValidateCampaignID(id) != nil {
		return "", badField("id", "want a campaign id (16 lower-case hex digits)")
	}
	return id, nil
}

func (a *api) startCampaign(w http.ResponseWriter, r *http.Request) {
	var req adminapi.CampaignRequest
	if err := decodeLimited(w, r, &req, maxCampaignBody); err != nil {
		a.fail(w, r, err)
		return
	}
	cr, err := campaignRequest(req)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	ctx, cancel := a.ctx(r)
	defer cancel()
	c, err := a.opts.Campaigns.Create(ctx, cr)
	if err != nil {
		a.campaignFail(w, r, err)
		return
	}
	a.audit(r, "campaign started", "campaign", c.ID, "select", c.Selection.Kind, "what", string(c.What), "rate", c.Rate)
	w.Header().Set("Location", "/v1/campaigns/"+c.ID)
	writeJSON(w, http.StatusCreated, campaignView(c))
}

// campaignRequest checks the request's fields and converts it; the key
// service checks the rest (the serial numbers of a list among them).
func campaignRequest(req adminapi.CampaignRequest) (keysvc.CampaignRequest, error) {
	out := keysvc.CampaignRequest{What: codec.What(req.What), Rate: req.Rate,
		Selection: keysvc.Selection{Kind: req.Select, Status: keysvc.Status(req.Status), SNs: req.SNs}}
	switch out.What {
	case codec.WhatPwd, codec.WhatBK, codec.WhatAll:
	default:
		return out, badField("what", "want pwd, bk or all")
	}
	if out.Rate == 0 {
		out.Rate = adminapi.DefaultCampaignRate
	}
	if out.Rate < 0 {
		return out, badField("rate", "want changes per second above 0")
	}
	switch req.Select {
	case keysvc.SelectAll, keysvc.SelectExpiring, keysvc.SelectList, keysvc.SelectStatus:
	default:
		return out, badField("select", "want all, expiring, list or status")
	}
	if (req.Select == keysvc.SelectList) != (len(req.SNs) > 0) {
		return out, badField("sns", "give serial numbers with select list, and only then")
	}
	if (req.Select == keysvc.SelectStatus) != (req.Status != "") {
		return out, badField("status", "give a status (active or disabled) with select status, and only then")
	}
	if (req.Select == keysvc.SelectExpiring) != (req.Before != "") {
		return out, badField("before", "give a date with select expiring, and only then")
	}
	if req.Before != "" {
		t, err := parseDate("before", req.Before) // reports.go
		if err != nil {
			return out, err
		}
		out.Selection.Before = t
	}
	return out, nil
}

func (a *api) listCampaigns(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := a.ctx(r)
	defer cancel()
	cs, err := a.opts.Campaigns.List(ctx)
	if err != nil {
		a.campaignFail(w, r, err)
		return
	}
	out := adminapi.CampaignList{Campaigns: make([]adminapi.Campaign, 0, len(cs))}
	for _, c := range cs {
		out.Campaigns = append(out.Campaigns, campaignView(c))
	}
	writeJSON(w, http.StatusOK, out)
}

func (a *api) getCampaign(w http.ResponseWriter, r *http.Request) {
	id, err := pathCampaign(r)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	ctx, cancel := a.ctx(r)
	defer cancel()
	c, err := a.opts.Campaigns.Get(ctx, id)
	if err != nil {
		a.campaignFail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, campaignView(c))
}

func (a *api) cancelCampaign(w http.ResponseWriter, r *http.Request) {
	id, err := pathCampaign(r)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	ctx, cancel := a.ctx(r)
	defer cancel()
	c, err := a.opts.Campaigns.Cancel(ctx, id)
	if err != nil {
		a.campaignFail(w, r, err)
		return
	}
	a.audit(r, "campaign cancelled", "campaign", id)
	writeJSON(w, http.StatusOK, campaignView(c))
}

func (a *api) campaignTerminals(w http.ResponseWriter, r *http.Request) {
	id, err := pathCampaign(r)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	q := r.URL.Query()
	outcome := keysvc.Outcome(q.Get("outcome"))
	if outcome != "" && !outcome.Valid() {
		a.fail(w, r, badField("outcome", "want waiting, delivered, committed, expired, busy, inactive, failed or starting"))
		return
	}
	after, limit, err := pageParams(q)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	ctx, cancel := a.ctx(r)
	defer cancel()
	items, next, err := a.opts.Campaigns.Items(ctx, id, outcome, after, limit)
	if err != nil {
		a.campaignFail(w, r, err)
		return
	}
	out := adminapi.CampaignTerminalList{Terminals: make([]adminapi.CampaignTerminal, 0, len(items)), Next: next}
	for _, it := range items {
		out.Terminals = append(out.Terminals, campaignTerminalView(it))
	}
	writeJSON(w, http.StatusOK, out)
}
