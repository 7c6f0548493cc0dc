package admin

import (
	"encoding/hex"

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
