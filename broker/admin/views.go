package admin

import (
	"encoding/hex"
	"time"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/keysvc"
)

// The answers' JSON types are package adminapi's; these build them from
// the key service's records.

// terminalView is t with its last login, if the API keeps them.
func (a *api) terminalView(t *keysvc.Terminal) adminapi.Terminal {
	v := terminalView(t)
	v.LastSeen = a.lastSeen(t.SN)
	return v
}

func (a *api) lastSeen(sn string) *adminapi.LastSeen {
	if a.opts.LastSeen == nil {
		return nil
	}
	e, ok := a.opts.LastSeen.Get(sn)
	if !ok {
		return nil
	}
	return &adminapi.LastSeen{At: e.At.UTC(), Remote: e.Remote, Protocol: e.Protocol, SessionKey: e.SessionKey}
}

func terminalView(t *keysvc.Terminal) adminapi.Terminal {
	v := adminapi.Terminal{
		SN: t.SN, IMEI: t.IMEI, IMSI: t.IMSI, MSISDN: t.MSISDN, Alg: t.Alg.String(), Status: string(t.Status),
		RequireEncryption: t.RequireEncryption, UpExp: t.Creds.UpExp, DownExp: t.Creds.DownExp, BKExp: t.Creds.BKExp,
		Pending: changeView(t.Pending), Created: t.Created, Updated: t.Updated,
	}
	if t.LastCommitted != 0 {
		v.LastCommitted = t.LastCommitted.String()
	}
	return v
}

func changeView(c *keysvc.Change) *adminapi.Change {
	if c == nil {
		return nil
	}
	return &adminapi.Change{RID: c.RID.String(), What: string(c.What), Mode: string(c.Mode), Origin: c.Origin,
		Started: c.Started, Deadline: c.Deadline, Delivered: c.Delivered}
}

func bundleOf(t *keysvc.Terminal, brokerURL string) adminapi.Bundle {
	return adminapi.Bundle{
		SN: t.SN, IMEI: t.IMEI, IMSI: t.IMSI, MSISDN: t.MSISDN, Alg: t.Alg.String(), RequireEncryption: t.RequireEncryption,
		Up: string(t.Creds.Up), UpExp: t.Creds.UpExp, Down: string(t.Creds.Down), DownExp: t.Creds.DownExp,
		BK: hex.EncodeToString(t.Creds.BK), BKExp: t.Creds.BKExp, BrokerURL: brokerURL,
	}
}

func appView(a *keysvc.App) adminapi.App {
	return adminapi.App{Name: a.Name, Subscribe: a.Subscribe, Publish: a.Publish, Created: a.Created}
}

func campaignView(c *keysvc.Campaign) adminapi.Campaign {
	v := adminapi.Campaign{ID: c.ID, Select: c.Selection.Kind, Status: string(c.Selection.Status), ListSize: len(c.Selection.SNs),
		What: string(c.What), Rate: c.Rate, State: string(c.State), Cursor: c.Cursor, Handled: c.Counts.Handled(),
		Counts: adminapi.Counts{Waiting: c.Counts.Waiting, Delivered: c.Counts.Delivered, Committed: c.Counts.Committed,
			Expired: c.Counts.Expired, Busy: c.Counts.Busy, Inactive: c.Counts.Inactive, Failed: c.Counts.Failed},
		Created: c.Created, Updated: c.Updated, Finished: c.Finished}
	if !c.Selection.Before.IsZero() {
		v.Before = c.Selection.Before.UTC().Format(time.RFC3339)
	}
	return v
}

func campaignTerminalView(it keysvc.CampaignItem) adminapi.CampaignTerminal {
	v := adminapi.CampaignTerminal{SN: it.SN, Outcome: string(it.Outcome), Deadline: it.Deadline, Reason: it.Reason, Updated: it.Updated}
	if it.RID != 0 && it.Outcome != keysvc.OutcomeStarting { // an intent's RID is not a change of the campaign
		v.RID = it.RID.String()
	}
	return v
}
