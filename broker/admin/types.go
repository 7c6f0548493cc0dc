package admin

import (
	"encoding/hex"
	"time"

	"github.com/m2mguard/m2mguard/keysvc"
)

// Error is the body of every error answer.
type Error struct {
	Error string `json:"error"`
	Field string `json:"field,omitempty"` // the request field at fault, if one is
}

// RegisterRequest is the body of POST /v1/terminals.
type RegisterRequest struct {
	SN                string `json:"sn"`
	IMEI              string `json:"imei"`
	IMSI              string `json:"imsi"`
	MSISDN            string `json:"msisdn,omitempty"`
	Alg               string `json:"alg,omitempty"` // md5 or hs256 (default)
	RequireEncryption bool   `json:"require_encryption,omitempty"`
}

// Bundle is the provisioning bundle of a new terminal: everything a factory
// writes into the device. It is returned once, by POST /v1/terminals, and
// never again: GET shows the record without secrets.
type Bundle struct {
	SN                string `json:"sn"`
	IMEI              string `json:"imei"`
	IMSI              string `json:"imsi"`
	MSISDN            string `json:"msisdn,omitempty"`
	Alg               string `json:"alg"`
	RequireEncryption bool   `json:"require_encryption"`
	Up                string `json:"up"`    // uplink access password
	UpExp             uint32 `json:"upexp"` // unix seconds; 4294967295 = never
	Down              string `json:"down"`  // downlink access password
	DownExp           uint32 `json:"downexp"`
	BK                string `json:"bk"` // basic key, 64 lower-case hex digits
	BKExp             uint32 `json:"bkexp"`
	BrokerURL         string `json:"broker_url"`
}

// Terminal is a terminal record without its secrets.
type Terminal struct {
	SN                string    `json:"sn"`
	IMEI              string    `json:"imei"`
	IMSI              string    `json:"imsi"`
	MSISDN            string    `json:"msisdn,omitempty"`
	Alg               string    `json:"alg"`
	Status            string    `json:"status"`
	RequireEncryption bool      `json:"require_encryption"`
	UpExp             uint32    `json:"upexp"`
	DownExp           uint32    `json:"downexp"`
	BKExp             uint32    `json:"bkexp"`
	Pending           *Change   `json:"pending,omitempty"`
	LastCommitted     string    `json:"last_committed,omitempty"`
	Created           time.Time `json:"created"`
	Updated           time.Time `json:"updated"`
}

// Change is the metadata of a credential change (never its new values).
type Change struct {
	RID       string    `json:"rid"`
	What      string    `json:"what"`
	Mode      string    `json:"mode"`
	Origin    string    `json:"origin"`
	Started   time.Time `json:"started"`
	Deadline  time.Time `json:"deadline"`
	Delivered bool      `json:"delivered"`
}

// ChangeRequest is the body of POST /v1/terminals/{sn}/changes.
type ChangeRequest struct {
	What string `json:"what"` // pwd, bk or all
}

// TerminalList is a page of GET /v1/terminals.
type TerminalList struct {
	Terminals []Terminal `json:"terminals"`
	Next      string     `json:"next,omitempty"` // pass as ?after= for the next page; "" at the end
}

// ImportEvent is one line of the NDJSON stream of POST /v1/terminals/import:
// progress lines, then one line with the report (or an error).
type ImportEvent struct {
	Progress *Progress     `json:"progress,omitempty"`
	Report   *ImportReport `json:"report,omitempty"`
	Error    string        `json:"error,omitempty"`
}

// Progress counts the rows stored so far.
type Progress struct {
	Done  int `json:"done"`
	Total int `json:"total"`
}

// ImportReport is keysvc.ImportReport in JSON.
type ImportReport struct {
	Rows     int         `json:"rows"`
	Created  int         `json:"created"`
	Rejected []RowResult `json:"rejected"`
}

// RowResult is a rejected row.
type RowResult struct {
	Line   int    `json:"line"`
	SN     string `json:"sn,omitempty"`
	Reason string `json:"reason"`
}

// AppRequest is the body of POST /v1/apps. An empty password is generated
// and returned once.
type AppRequest struct {
	Name      string   `json:"name"`
	Password  string   `json:"password,omitempty"`
	Subscribe []string `json:"subscribe,omitempty"`
	Publish   []string `json:"publish,omitempty"`
}

// App is an application without its password hash; Password is set only in
// the answer to a POST that generated it.
type App struct {
	Name      string    `json:"name"`
	Password  string    `json:"password,omitempty"`
	Subscribe []string  `json:"subscribe"`
	Publish   []string  `json:"publish"`
	Created   time.Time `json:"created"`
}

// AppList is the answer of GET /v1/apps.
type AppList struct {
	Apps []string `json:"apps"`
}

// Health is the answer of GET /healthz.
type Health struct {
	Status string `json:"status"`          // ok or unavailable
	Store  string `json:"store"`           // ok or unavailable
	Error  string `json:"error,omitempty"` // a fixed text: the cause is logged, not shown
}

func terminalView(t *keysvc.Terminal) Terminal {
	v := Terminal{
		SN: t.SN, IMEI: t.IMEI, IMSI: t.IMSI, MSISDN: t.MSISDN, Alg: t.Alg.String(), Status: string(t.Status),
		RequireEncryption: t.RequireEncryption, UpExp: t.Creds.UpExp, DownExp: t.Creds.DownExp, BKExp: t.Creds.BKExp,
		Pending: changeView(t.Pending), Created: t.Created, Updated: t.Updated,
	}
	if t.LastCommitted != 0 {
		v.LastCommitted = t.LastCommitted.String()
	}
	return v
}

func changeView(c *keysvc.Change) *Change {
	if c == nil {
		return nil
	}
	return &Change{RID: c.RID.String(), What: string(c.What), Mode: string(c.Mode), Origin: c.Origin,
		Started: c.Started, Deadline: c.Deadline, Delivered: c.Delivered}
}

func bundleOf(t *keysvc.Terminal, brokerURL string) Bundle {
	return Bundle{
		SN: t.SN, IMEI: t.IMEI, IMSI: t.IMSI, MSISDN: t.MSISDN, Alg: t.Alg.String(), RequireEncryption: t.RequireEncryption,
		Up: string(t.Creds.Up), UpExp: t.Creds.UpExp, Down: string(t.Creds.Down), DownExp: t.Creds.DownExp,
		BK: hex.EncodeToString(t.Creds.BK), BKExp: t.Creds.BKExp, BrokerURL: brokerURL,
	}
}

func appView(a *keysvc.App) App {
	return App{Name: a.Name, Subscribe: a.Subscribe, Publish: a.Publish, Created: a.Created}
}
