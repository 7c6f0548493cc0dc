package vaultstore

import (
	"context"
	"errors"
	"fmt"
	"path"
	"sort"
	"strconv"
	"strings"

	vault "github.com/hashicorp/vault/api"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

// Campaigns (keysvc.CampaignStore), as string fields like terminals:
//
//	<prefix>/campaigns/<id>             id select before status what rate state cursor
//	                                    waiting delivered committed expired busy inactive failed
//	                                    created updated finished
//	<prefix>/campaign-lists/<id>        sns: the serial numbers of a list selection, comma-separated (written once)
//	<prefix>/campaign-items/<id>/<sn>   sn outcome rid deadline reason updated
//
// The campaign entry is written with check-and-set (cas=0 to create);
// items are plain writes.

func (s *Store) campaignPath(id string) string { return path.Join(s.prefix, "campaigns", id) }
func (s *Store) campaignListPath(id string) string {
	return path.Join(s.prefix, "campaign-lists", id)
}
func (s *Store) campaignItemPath(id, sn string) string {
	return path.Join(s.prefix, "campaign-items", id, sn)
}

// CreateCampaign implements keysvc.CampaignStore.
func (s *Store) CreateCampaign(ctx context.Context, c *keysvc.Campaign) error {
	if err := keysvc.ValidateCampaignID(c.ID); err != nil {
		return fmt.Errorf("vaultstore: create campaign: %w", err)
	}
	if c.Selection.Kind == keysvc.SelectList {
		// The list first: a campaign entry without its list would not
		// open; a list without its entry is never read.
		p := s.campaignListPath(c.ID)
		if _, err := s.kv.Put(ctx, p, map[string]any{"sns": strings.Join(c.Selection.SNs, ",")}); err != nil {
			return s.wrap("create", p, err)
		}
	}
	p := s.campaignPath(c.ID)
	sec, err := s.kv.Put(ctx, p, encodeCampaign(c), vault.WithCheckAndSet(0))
	if err != nil {
		err = s.wrap("create", p, err)
		if errors.Is(err, keysvc.ErrConflict) {
			return fmt.Errorf("vaultstore: create %s: %w", p, keysvc.ErrExists)
		}
		return err
	}
	c.Version = uint64(versionOf(sec))
	return nil
}

// GetCampaign implements keysvc.CampaignStore.
func (s *Store) GetCampaign(ctx context.Context, id string) (*keysvc.Campaign, error) {
	if err := keysvc.ValidateCampaignID(id); err != nil {
		return nil, fmt.Errorf("vaultstore: get campaign: %w", err)
	}
	p := s.campaignPath(id)
	sec, err := s.kv.Get(ctx, p)
	if err != nil {
		return nil, s.wrap("get", p, err)
	}
	c, err := decodeCampaign(sec.Data, versionOf(sec))
	if err != nil || c.ID != id {
		if err == nil {
			err = fmt.Errorf("field \"id\" names another campaign: %w", keysvc.ErrInvalid)
		}
		return nil, fmt.Errorf("vaultstore: get %s: %w", p, err)
	}
	if c.Selection.Kind != keysvc.SelectList {
		return c, nil
	}
	lp := s.campaignListPath(id)
	lsec, err := s.kv.Get(ctx, lp)
	if err != nil {
		return nil, s.wrap("get", lp, err)
	}
	sns, _ := lsec.Data["sns"].(string)
	if len(sns) > keysvc.MaxCampaignList*(codec.MaxSNLen+1) {
		return nil, fmt.Errorf("vaultstore: get %s: field \"sns\": too long: %w", lp, keysvc.ErrInvalid)
	}
	if sns != "" {
		c.Selection.SNs = strings.Split(sns, ",")
	}
	return c, nil
}

// UpdateCampaign implements keysvc.CampaignStore: cas=c.Version. The
// selection is written once, by CreateCampaign.
func (s *Store) UpdateCampaign(ctx context.Context, c *keysvc.Campaign) error {
	if err := keysvc.ValidateCampaignID(c.ID); err != nil {
		return fmt.Errorf("vaultstore: update campaign: %w", err)
	}
	p := s.campaignPath(c.ID)
	if c.Version == 0 {
		if !s.exists(ctx, p) {
			return fmt.Errorf("vaultstore: update %s: %w", p, keysvc.ErrNotFound)
		}
		return fmt.Errorf("vaultstore: update %s: record was never read: %w", p, keysvc.ErrConflict)
	}
	sec, err := s.kv.Put(ctx, p, encodeCampaign(c), vault.WithCheckAndSet(int(c.Version)))
	if err != nil {
		err = s.wrap("update", p, err)
		if errors.Is(err, keysvc.ErrConflict) && !s.exists(ctx, p) {
			return fmt.Errorf("vaultstore: update %s: %w", p, keysvc.ErrNotFound)
		}
		return err
	}
	c.Version = uint64(versionOf(sec))
	return nil
}

// ListCampaigns implements keysvc.CampaignStore.
func (s *Store) ListCampaigns(ctx context.Context) ([]string, error) {
	return s.list(ctx, path.Join(s.prefix, "campaigns"))
}

// PutCampaignItems implements keysvc.CampaignStore: one read of the
// campaign's metadata (it must exist), then one write per item.
func (s *Store) PutCampaignItems(ctx context.Context, id string, items []keysvc.CampaignItem) error {
	if err := keysvc.ValidateCampaignID(id); err != nil {
		return fmt.Errorf("vaultstore: put campaign items: %w", err)
	}
	if _, err := s.kv.GetMetadata(ctx, s.campaignPath(id)); err != nil {
		return s.wrap("put items of", s.campaignPath(id), err)
	}
	for _, it := range items {
		if err := codec.ValidateSN(it.SN); err != nil {
			return fmt.Errorf("vaultstore: put campaign items: %w: %w", keysvc.ErrInvalid, err)
		}
		p := s.campaignItemPath(id, it.SN)
		if _, err := s.kv.Put(ctx, p, encodeItem(it)); err != nil {
			return s.wrap("put", p, err)
		}
	}
	return nil
}

// ListCampaignItems implements keysvc.CampaignStore: one list and one
// read per item returned.
func (s *Store) ListCampaignItems(ctx context.Context, id, after string, limit int) ([]keysvc.CampaignItem, error) {
	if err := keysvc.ValidateCampaignID(id); err != nil {
		return nil, fmt.Errorf("vaultstore: list campaign items: %w", err)
	}
	if _, err := s.kv.GetMetadata(ctx, s.campaignPath(id)); err != nil {
		return nil, s.wrap("list items of", s.campaignPath(id), err)
	}
	sns, err := s.list(ctx, path.Join(s.prefix, "campaign-items", id))
	if err != nil {
		if errors.Is(err, keysvc.ErrNotFound) {
			return nil, nil
		}
		return nil, err
	}
	i := sort.SearchStrings(sns, after)
	if i < len(sns) && sns[i] == after {
		i++
	}
	sns = sns[i:]
	if limit > 0 && len(sns) > limit {
		sns = sns[:limit]
	}
	out := make([]keysvc.CampaignItem, 0, len(sns))
	for _, sn := range sns {
		p := s.campaignItemPath(id, sn)
		sec, err := s.kv.Get(ctx, p)
		if err != nil {
			return nil, s.wrap("get", p, err)
		}
		it, err := decodeItem(sec.Data)
		if err != nil || it.SN != sn {
			if err == nil {
				err = fmt.Errorf("field \"sn\" names another terminal: %w", keysvc.ErrInvalid)
			}
			return nil, fmt.Errorf("vaultstore: get %s: %w", p, err)
		}
		out = append(out, it)
	}
	return out, nil
}

func encodeCampaign(c *keysvc.Campaign) map[string]any {
	m := map[string]any{
		"id":       c.ID,
		"select":   c.Selection.Kind,
		"before":   formatTime(c.Selection.Before),
		"status":   string(c.Selection.Status),
		"what":     string(c.What),
		"rate":     strconv.FormatFloat(c.Rate, 'g', -1, 64),
		"state":    string(c.State),
		"cursor":   c.Cursor,
		"created":  formatTime(c.Created),
		"updated":  formatTime(c.Updated),
		"finished": formatTime(c.Finished),
	}
	for _, o := range keysvc.Outcomes() {
		m[string(o)] = strconv.Itoa(c.Counts.Of(o))
	}
	return m
}

func decodeCampaign(m map[string]any, version int) (*keysvc.Campaign, error) {
	d := &decoder{m: m}
	c := &keysvc.Campaign{
		ID:        d.str("id"),
		Selection: keysvc.Selection{Kind: d.str("select"), Before: d.time("before"), Status: keysvc.Status(d.str("status"))},
		What:      codec.What(d.str("what")),
		State:     keysvc.CampaignState(d.str("state")),
		Cursor:    d.str("cursor"),
		Created:   d.time("created"),
		Updated:   d.time("updated"),
		Finished:  d.time("finished"),
		Version:   uint64(version),
	}
	rate, err := strconv.ParseFloat(d.str("rate"), 64)
	if err != nil {
		d.fail("rate", "want a number")
	}
	c.Rate = rate
	for _, o := range keysvc.Outcomes() {
		n, err := strconv.Atoi(d.str(string(o)))
		if err != nil || n < 0 {
			d.fail(string(o), "want a count")
		}
		c.Counts.Add(o, n)
	}
	if d.err != nil {
		return nil, d.err
	}
	return c, nil
}

func encodeItem(it keysvc.CampaignItem) map[string]any {
	return map[string]any{
		"sn":       it.SN,
		"outcome":  string(it.Outcome),
		"rid":      formatRID(it.RID),
		"deadline": formatTime(it.Deadline),
		"reason":   it.Reason,
		"updated":  formatTime(it.Updated),
	}
}

func decodeItem(m map[string]any) (keysvc.CampaignItem, error) {
	d := &decoder{m: m}
	it := keysvc.CampaignItem{
		SN:       d.str("sn"),
		Outcome:  keysvc.Outcome(d.str("outcome")),
		RID:      d.rid("rid", true),
		Deadline: d.time("deadline"),
		Reason:   d.str("reason"),
		Updated:  d.time("updated"),
	}
	if !it.Outcome.Valid() {
		d.fail("outcome", "not an outcome")
	}
	return it, d.err
}
