package boltstore

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/keysvc"
)

// Campaigns (keysvc.CampaignStore). A campaign is three things, each
// sealed like every record (the authenticated data binds a value to its
// bucket, key and version):
//
//	campaigns/<id>            the record (JSON), its own version for check-and-set
//	campaign_lists/<id>       the serial numbers of a list selection (JSON), written once
//	campaign_items/<id>/<sn>  one item per terminal handled (JSON), a bucket per campaign
//
// They are not covered by the integrity head (integrity.go): a campaign
// record rolled back or deleted by someone with write access to the file
// at most makes a resumed campaign handle some terminals again (their
// changes are then busy, or they get one more rotation). It gives no
// access to anything, and the records the head covers (terminals,
// applications) are checked as before.

var (
	bucketCampaigns     = []byte("campaigns")
	bucketCampaignLists = []byte("campaign_lists")
	bucketCampaignItems = []byte("campaign_items")
)

// campaignRecord is the plaintext of a campaign (without its list).
type campaignRecord struct {
	ID       string                `json:"id"`
	Select   string                `json:"select"`
	Before   time.Time             `json:"before,omitzero"`
	Status   keysvc.Status         `json:"status,omitempty"`
	What     codec.What            `json:"what"`
	Rate     float64               `json:"rate"`
	State    keysvc.CampaignState  `json:"state"`
	Cursor   string                `json:"cursor,omitempty"`
	Counts   keysvc.CampaignCounts `json:"counts"`
	Created  time.Time             `json:"created"`
	Updated  time.Time             `json:"updated"`
	Finished time.Time             `json:"finished,omitzero"`
}

type itemRecord struct {
	SN       string         `json:"sn"`
	Outcome  keysvc.Outcome `json:"outcome"`
	RID      string         `json:"rid,omitempty"`
	Deadline time.Time      `json:"deadline,omitzero"`
	Reason   string         `json:"reason,omitempty"`
	Updated  time.Time      `json:"updated"`
}

func checkCampaignID(id string) error { return keysvc.ValidateCampaignID(id) }

// itemsBucket names the sealed values of campaign id's items: their
// authenticated data says which campaign they belong to.
func itemsBucket(id string) []byte {
	return append(append([]byte(nil), bucketCampaignItems...), "/"+id...)
}

// CreateCampaign implements keysvc.CampaignStore.
func (s *Store) CreateCampaign(ctx context.Context, c *keysvc.Campaign) error {
	if c == nil {
		return s.wrap("create campaign", "", fmt.Errorf("%w: nil campaign", keysvc.ErrInvalid))
	}
	if err := checkCampaignID(c.ID); err != nil {
		return s.wrap("create campaign", "", err)
	}
	rec, err := json.Marshal(toCampaignRecord(c))
	if err != nil {
		return s.wrap("create campaign", c.ID, err)
	}
	var list []byte
	if c.Selection.Kind == keysvc.SelectList {
		if list, err = json.Marshal(c.Selection.SNs); err != nil {
			return s.wrap("create campaign", c.ID, err)
		}
	}
	key := []byte(c.ID)
	err = s.update(ctx, func(w *batch) error {
		b := w.tx.Bucket(bucketCampaigns)
		if b.Get(key) != nil {
			return keysvc.ErrExists
		}
		if err := b.Put(key, s.seal(bucketCampaigns, key, 1, rec)); err != nil {
			return err
		}
		if list != nil {
			return w.tx.Bucket(bucketCampaignLists).Put(key, s.seal(bucketCampaignLists, key, 1, list))
		}
		return nil
	})
	if err != nil {
		return s.wrap("create campaign", c.ID, err)
	}
	c.Version = 1
	return nil
}

// GetCampaign implements keysvc.CampaignStore.
func (s *Store) GetCampaign(ctx context.Context, id string) (*keysvc.Campaign, error) {
	if err := checkCampaignID(id); err != nil {
		return nil, s.wrap("get campaign", "", err)
	}
	key := []byte(id)
	var c *keysvc.Campaign
	err := s.view(ctx, func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketCampaigns).Get(key)
		if v == nil {
			return keysvc.ErrNotFound
		}
		version, pt, err := s.open(bucketCampaigns, key, v)
		if err != nil {
			return err
		}
		var r campaignRecord
		if err := json.Unmarshal(pt, &r); err != nil || r.ID != id {
			return fmt.Errorf("%w: corrupt campaign record", keysvc.ErrInvalid)
		}
		c = r.campaign()
		c.Version = version
		if c.Selection.Kind != keysvc.SelectList {
			return nil
		}
		lv := tx.Bucket(bucketCampaignLists).Get(key)
		if lv == nil {
			return fmt.Errorf("%w: campaign list missing", keysvc.ErrInvalid)
		}
		_, lpt, err := s.open(bucketCampaignLists, key, lv)
		if err != nil {
			return err
		}
		if err := json.Unmarshal(lpt, &c.Selection.SNs); err != nil {
			return fmt.Errorf("%w: corrupt campaign list", keysvc.ErrInvalid)
		}
		return nil
	})
	if err != nil {
		return nil, s.wrap("get campaign", id, err)
	}
	return c, nil
}

// UpdateCampaign implements keysvc.CampaignStore. The selection is
// written once, by CreateCampaign: an update does not change it.
func (s *Store) UpdateCampaign(ctx context.Context, c *keysvc.Campaign) error {
	if c == nil {
		return s.wrap("update campaign", "", fmt.Errorf("%w: nil campaign", keysvc.ErrInvalid))
	}
	if err := checkCampaignID(c.ID); err != nil {
		return s.wrap("update campaign", "", err)
	}
	rec, err := json.Marshal(toCampaignRecord(c))
	if err != nil {
		return s.wrap("update campaign", c.ID, err)
	}
	key := []byte(c.ID)
	var version uint64
	err = s.update(ctx, func(w *batch) error {
		b := w.tx.Bucket(bucketCampaigns)
		cur := b.Get(key)
		if cur == nil {
			return keysvc.ErrNotFound
		}
		if storedVersion(cur) != c.Version {
			return keysvc.ErrConflict
		}
		version = c.Version + 1
		return b.Put(key, s.seal(bucketCampaigns, key, version, rec))
	})
	if err != nil {
		return s.wrap("update campaign", c.ID, err)
	}
	c.Version = version
	return nil
}

// ListCampaigns implements keysvc.CampaignStore.
func (s *Store) ListCampaigns(ctx context.Context) ([]string, error) {
	var out []string
	err := s.view(ctx, func(tx *bolt.Tx) error {
		return tx.Bucket(bucketCampaigns).ForEach(func(k, _ []byte) error {
			out = append(out, string(k))
			return nil
		})
	})
	if err != nil {
		return nil, s.wrap("list campaigns", "", err)
	}
	return out, nil
}

// PutCampaignItems implements keysvc.CampaignStore: all items in one
// transaction. The campaign must exist.
func (s *Store) PutCampaignItems(ctx context.Context, id string, items []keysvc.CampaignItem) error {
	if err := checkCampaignID(id); err != nil {
		return s.wrap("put campaign items", "", err)
	}
	vals := make([][]byte, len(items))
	for i, it := range items {
		if err := checkSN(it.SN); err != nil {
			return s.wrap("put campaign items", id, err)
		}
		v, err := json.Marshal(toItemRecord(it))
		if err != nil {
			return s.wrap("put campaign items", id, err)
		}
		vals[i] = v
	}
	sealAs := itemsBucket(id)
	err := s.update(ctx, func(w *batch) error {
		if w.tx.Bucket(bucketCampaigns).Get([]byte(id)) == nil {
			return keysvc.ErrNotFound
		}
		b, err := w.tx.Bucket(bucketCampaignItems).CreateBucketIfNotExists([]byte(id))
		if err != nil {
			return err
		}
		for i, it := range items {
			key := []byte(it.SN)
			version := storedVersion(b.Get(key)) + 1
			if err := b.Put(key, s.seal(sealAs, key, version, vals[i])); err != nil {
				return err
			}
		}
		return nil
	})
	return s.wrap("put campaign items", id, err)
}

// ListCampaignItems implements keysvc.CampaignStore.
func (s *Store) ListCampaignItems(ctx context.Context, id, after string, limit int) ([]keysvc.CampaignItem, error) {
	if err := checkCampaignID(id); err != nil {
		return nil, s.wrap("list campaign items", "", err)
	}
	sealAs := itemsBucket(id)
	var out []keysvc.CampaignItem
	err := s.view(ctx, func(tx *bolt.Tx) error {
		if tx.Bucket(bucketCampaigns).Get([]byte(id)) == nil {
			return keysvc.ErrNotFound
		}
		b := tx.Bucket(bucketCampaignItems).Bucket([]byte(id))
		if b == nil {
			return nil
		}
		c := b.Cursor()
		k, v := c.Seek([]byte(after))
		if k != nil && bytes.Equal(k, []byte(after)) {
			k, v = c.Next()
		}
		for ; k != nil && (limit <= 0 || len(out) < limit); k, v = c.Next() {
			_, pt, err := s.open(sealAs, k, v)
			if err != nil {
				return err
			}
			var r itemRecord
			if err := json.Unmarshal(pt, &r); err != nil || r.SN != string(k) {
				return fmt.Errorf("%w: corrupt campaign item", keysvc.ErrInvalid)
			}
			it, err := r.item()
			if err != nil {
				return err
			}
			out = append(out, it)
		}
		return nil
	})
	if err != nil {
		return nil, s.wrap("list campaign items", id, err)
	}
	return out, nil
}

func toCampaignRecord(c *keysvc.Campaign) campaignRecord {
	return campaignRecord{ID: c.ID, Select: c.Selection.Kind, Before: c.Selection.Before, Status: c.Selection.Status,
		What: c.What, Rate: c.Rate, State: c.State, Cursor: c.Cursor, Counts: c.Counts,
		Created: c.Created, Updated: c.Updated, Finished: c.Finished}
}

func (r *campaignRecord) campaign() *keysvc.Campaign {
	return &keysvc.Campaign{ID: r.ID, Selection: keysvc.Selection{Kind: r.Select, Before: r.Before, Status: r.Status},
		What: r.What, Rate: r.Rate, State: r.State, Cursor: r.Cursor, Counts: r.Counts,
		Created: r.Created, Updated: r.Updated, Finished: r.Finished}
}

func toItemRecord(it keysvc.CampaignItem) itemRecord {
	r := itemRecord{SN: it.SN, Outcome: it.Outcome, Deadline: it.Deadline, Reason: it.Reason, Updated: it.Updated}
	if it.RID != 0 {
		r.RID = it.RID.String()
	}
	return r
}

func (r *itemRecord) item() (keysvc.CampaignItem, error) {
	it := keysvc.CampaignItem{SN: r.SN, Outcome: r.Outcome, Deadline: r.Deadline, Reason: r.Reason, Updated: r.Updated}
	if r.RID != "" {
		rid, err := codec.ParseID(r.RID)
		if err != nil {
			return it, fmt.Errorf("%w: corrupt campaign item", keysvc.ErrInvalid)
		}
		it.RID = rid
	}
	return it, nil
}
