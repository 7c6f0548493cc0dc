package adminapi

import (
	"crypto/sha256"
	"encoding/hex"
	"time"
)

// Never is the expiry (unix seconds) of a credential that does not expire.
const Never uint32 = 4294967295

// RegisterRequest is the body of POST /v1/terminals.
type RegisterRequest struct {
	SN                string `json:"sn"`
	IMEI              string `json:"imei"`
	IMSI              string `json:"imsi"`
	MSISDN            string `json:"msisdn,omitempty"`
	Alg               string `json:"alg,omitempty"` // md5 or hs256 ("" = hs256)
	RequireEncryption bool   `json:"require_encryption,omitempty"`
}

// Bundle is the provisioning bundle of a terminal: everything a factory
// writes into the device. POST /v1/terminals and POST
// /v1/terminals/{sn}/rekey return it, once; nothing shows it again.
type Bundle struct {
	SN                string `json:"sn"`
	IMEI              string `json:"imei"`
	IMSI              string `json:"imsi"`
	MSISDN            string `json:"msisdn,omitempty"`
	Alg               string `json:"alg"`
	RequireEncryption bool   `json:"require_encryption"`
	Up                string `json:"up"`    // uplink access password
	UpExp             uint32 `json:"upexp"` // unix seconds; Never = does not expire
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
	Status            string    `json:"status"` // active or disabled
	RequireEncryption bool      `json:"require_encryption"`
	UpExp             uint32    `json:"upexp"`
	DownExp           uint32    `json:"downexp"`
	BKExp             uint32    `json:"bkexp"`
	Pending           *Change   `json:"pending,omitempty"`
	LastCommitted     string    `json:"last_committed,omitempty"` // rid of the last committed change
	Created           time.Time `json:"created"`
	Updated           time.Time `json:"updated"`
	LastSeen          *LastSeen `json:"last_seen,omitempty"` // nil: never logged in (or the broker keeps no record)
}

// LastSeen is a terminal's last accepted login. A broker writes it to its
// data directory every few seconds, so a crash loses at most those.
type LastSeen struct {
	At         time.Time `json:"at"`
	Remote     string    `json:"remote"`      // host:port of the client
	Protocol   byte      `json:"protocol"`    // 4 = MQTT 3.1.1, 5 = MQTT 5
	SessionKey bool      `json:"session_key"` // the login took a session key
}

// Change is the metadata of a credential change (never its new values).
type Change struct {
	RID       string    `json:"rid"`
	What      string    `json:"what"`   // pwd, bk or all
	Mode      string    `json:"mode"`   // how the new values travel: cipher or sms
	Origin    string    `json:"origin"` // operator, terminal or expiry
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

// ImportEvent is one line of the NDJSON stream of POST
// /v1/terminals/import: progress lines, then one line with the report
// (and an error if the import stopped). With ?creds=true, the
// provisioning bundle of each terminal stored comes on a line of its own
// before the progress line of its batch: the one time its secrets are
// shown.
type ImportEvent struct {
	Progress *Progress     `json:"progress,omitempty"`
	Bundle   *Bundle       `json:"bundle,omitempty"`
	Report   *ImportReport `json:"report,omitempty"`
	Error    string        `json:"error,omitempty"`
}

// Progress counts the rows read so far (stored or rejected) of Total.
type Progress struct {
	Done  int `json:"done"`
	Total int `json:"total"`
}

// ImportReport is the outcome of an import.
type ImportReport struct {
	Rows     int         `json:"rows"`
	Created  int         `json:"created"`
	Rejected []RowResult `json:"rejected"`
}

// RowResult is a rejected row of an import.
type RowResult struct {
	Line   int    `json:"line"` // line of the CSV body, the header being line 1
	SN     string `json:"sn,omitempty"`
	Reason string `json:"reason"`
}

// Session is one connected, authenticated client. It carries no secret.
type Session struct {
	ClientID   string    `json:"client_id"`
	Kind       string    `json:"kind"`          // "terminal" or "application"
	SN         string    `json:"sn,omitempty"`  // terminals
	App        string    `json:"app,omitempty"` // applications
	Remote     string    `json:"remote"`
	Protocol   byte      `json:"protocol"`               // 4 = MQTT 3.1.1, 5 = MQTT 5
	SessionKey bool      `json:"session_key"`            // data is sealed
	SID        string    `json:"sid,omitempty"`          // session key id
	KeyExpires time.Time `json:"key_expires,omitzero"`   // when the platform ends the session
	UplinkSeq  uint64    `json:"uplink_seq,omitempty"`   // highest uplink envelope accepted
	DownSeq    uint64    `json:"downlink_seq,omitempty"` // last downlink envelope sealed
	Since      time.Time `json:"since,omitzero"`         // when the session was established
	Broker     string    `json:"broker,omitempty"`       // the broker holding it (fleet mode)
}

// SessionList is the answer of GET /v1/sessions, sorted by ClientID.
type SessionList struct {
	Sessions []Session `json:"sessions"`
	// Warnings say why the list may be incomplete, in fleet mode: a
	// broker that did not answer (its sessions are missing), or the fleet
	// unreachable (the list holds the answering broker's alone).
	Warnings []string `json:"warnings,omitempty"`
}

// AppRequest is the body of POST /v1/apps. An empty Password is generated
// and returned once; empty filter lists get the defaults (m2m/+/up/# and
// m2m/+/down/#).
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

// AppList is the answer of GET /v1/apps, sorted.
type AppList struct {
	Apps []string `json:"apps"`
}

// Health is the answer of GET /healthz (200 ok, 503 unavailable).
type Health struct {
	Status string `json:"status"`          // ok or unavailable
	Store  string `json:"store"`           // ok or unavailable
	Error  string `json:"error,omitempty"` // a fixed text: the cause is logged, not shown
}

// CampaignRequest is the body of POST /v1/campaigns: a fleet-wide
// credential change.
type CampaignRequest struct {
	// Select is which terminals: all, expiring (a credential the change
	// replaces expires before Before), list (the serial numbers of SNs) or
	// status (terminals whose status is Status).
	Select string   `json:"select"`
	Before string   `json:"before,omitempty"` // expiring: a date (2026-01-31) or an RFC 3339 time
	Status string   `json:"status,omitempty"` // status: active or disabled
	SNs    []string `json:"sns,omitempty"`    // list: at most 100,000 serial numbers
	What   string   `json:"what"`             // pwd, bk or all
	// Rate is how many changes start per second, at most the broker's
	// campaigns.max_rate; 0 = DefaultCampaignRate.
	Rate float64 `json:"rate,omitempty"`
}

// DefaultCampaignRate is the rate of a campaign that asks for none.
const DefaultCampaignRate = 10

// Campaign is a campaign and its progress.
type Campaign struct {
	ID       string    `json:"id"`
	Select   string    `json:"select"`
	Before   string    `json:"before,omitempty"`    // expiring: RFC 3339
	Status   string    `json:"status,omitempty"`    // status selection
	ListSize int       `json:"list_size,omitempty"` // list selection: how many serial numbers
	What     string    `json:"what"`
	Rate     float64   `json:"rate"`
	State    string    `json:"state"`            // running, tracking, done or cancelled
	Cursor   string    `json:"cursor,omitempty"` // the last serial number handled, in sorted order
	Handled  int       `json:"handled"`          // terminals handled so far: the sum of Counts
	Counts   Counts    `json:"counts"`
	Created  time.Time `json:"created"`
	Updated  time.Time `json:"updated"`
	Finished time.Time `json:"finished,omitzero"`
}

// Counts count a campaign's terminals by outcome.
type Counts struct {
	Waiting   int `json:"waiting"`   // started; not delivered yet (offline: it goes out at the next login)
	Delivered int `json:"delivered"` // new values sent; not acknowledged yet
	Committed int `json:"committed"`
	Expired   int `json:"expired"`  // passed its deadline (or was cancelled) uncommitted: the old values stay
	Busy      int `json:"busy"`     // skipped: another change was pending
	Inactive  int `json:"inactive"` // skipped: the terminal is disabled
	Failed    int `json:"failed"`   // no change started (see the terminal's reason)
}

// CampaignList is the answer of GET /v1/campaigns, sorted by id.
type CampaignList struct {
	Campaigns []Campaign `json:"campaigns"`
}

// CampaignTerminal is one terminal a campaign handled.
type CampaignTerminal struct {
	SN       string    `json:"sn"`
	Outcome  string    `json:"outcome"`           // as Counts, or "starting" while its change is about to start
	RID      string    `json:"rid,omitempty"`     // the change started
	Deadline time.Time `json:"deadline,omitzero"` // of that change
	Reason   string    `json:"reason,omitempty"`  // failed: why
	Updated  time.Time `json:"updated"`
}

// CampaignTerminalList is a page of GET /v1/campaigns/{id}/terminals.
type CampaignTerminalList struct {
	Terminals []CampaignTerminal `json:"terminals"`
	// Next is the after of the next page; "" after the last one. A page
	// may hold fewer terminals than asked for (with an outcome filter, the
	// broker reads a bounded part of the campaign per request).
	Next string `json:"next,omitempty"`
}

// Operator is the answer of GET /v1/whoami: the name and role of the
// token that asked.
type Operator struct {
	Name string `json:"name"` // "admin" for the broker's admin.token
	Role string `json:"role"` // RoleFull or RoleRead
}

// OperatorLine returns the line of an operator in the broker's
// admin.tokens_file: its name, its role and the SHA-256 of its token (the
// broker stores no token, only this hash). token must be a random secret
// of at least 128 bits: a fast hash suffices for a secret nobody can guess,
// and keeps every request's check cheap.
func OperatorLine(name, role, token string) string {
	sum := sha256.Sum256([]byte(token))
	return name + " " + role + " sha256:" + hex.EncodeToString(sum[:])
}

// Operator roles.
const (
	RoleFull = "full" // may read and change
	RoleRead = "read" // may only read (GET); any change is 403
)

// Reports, the {kind} of GET /v1/reports/{kind}.
const (
	// ReportExpiring lists terminals with a password or basic key that
	// expires before ReportQuery.Before (or has expired).
	ReportExpiring = "expiring"
	// ReportNeverSeen lists terminals that never logged in.
	ReportNeverSeen = "never-seen"
	// ReportNotSeen lists terminals whose last login was before
	// ReportQuery.Since, those never seen included.
	ReportNotSeen = "not-seen"
)

// ReportQuery asks for a report.
type ReportQuery struct {
	Kind   string    // ReportExpiring, ReportNeverSeen or ReportNotSeen
	Before time.Time // ReportExpiring: expiries before this
	Since  time.Time // ReportNotSeen: last seen before this
}

// ReportRow is a terminal in a report.
type ReportRow struct {
	SN       string    `json:"sn"`
	Status   string    `json:"status"`
	UpExp    uint32    `json:"upexp"`
	DownExp  uint32    `json:"downexp"`
	BKExp    uint32    `json:"bkexp"`
	Expiring []string  `json:"expiring,omitempty"` // ReportExpiring: which of up, down and bk
	LastSeen *LastSeen `json:"last_seen,omitempty"`
}

// ReportProgress counts the terminals a report has looked at and the rows
// it has found so far.
type ReportProgress struct {
	Scanned int `json:"scanned"`
	Matched int `json:"matched"`
}

// ReportEvent is one line of the NDJSON stream of GET /v1/reports/{kind}:
// rows, a progress line after each page of the registry, then the done
// line (its counts are the whole report's), or an error line if the
// report stopped.
type ReportEvent struct {
	Row      *ReportRow      `json:"row,omitempty"`
	Progress *ReportProgress `json:"progress,omitempty"`
	Done     *ReportProgress `json:"done,omitempty"`
	Error    string          `json:"error,omitempty"`
}
