package hook

import (
	"errors"
	"sort"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// SessionInfo describes one authenticated connection, for operators. It
// carries no secret.
type SessionInfo struct {
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
	Broker     string    `json:"broker,omitempty"`       // the broker holding it, in a fleet
}

// ErrNoSession: no connected client has that ClientID.
var ErrNoSession = errors.New("hook: no such session")

// Sessions lists the connected, authenticated clients whose session is
// established (CONNACK sent), sorted by ClientID.
func (h *Hook) Sessions() []SessionInfo {
	var out []SessionInfo
	h.sessions.Range(func(k, v any) bool {
		cl, s := k.(*mqtt.Client), v.(*session)
		if s.state.Load() != stateEstablished {
			return true
		}
		out = append(out, h.info(cl, s))
		return true
	})
	sort.Slice(out, func(i, j int) bool { return out[i].ClientID < out[j].ClientID })
	return out
}

// info describes an established session.
func (h *Hook) info(cl *mqtt.Client, s *session) SessionInfo {
	info := SessionInfo{
		ClientID: cl.ID, Kind: s.kind.String(), Remote: cl.Net.Remote,
		Protocol: cl.Properties.ProtocolVersion, SessionKey: s.hasKey(), Since: s.since.UTC(),
	}
	if s.kind == kindTerminal {
		info.SN = s.sn
		if s.hasKey() {
			info.SID, info.KeyExpires = s.sid.String(), s.exp.UTC()
			info.UplinkSeq, info.DownSeq = s.upTop.Load(), s.downSeq.Load()
		}
	} else {
		info.App = s.app.Name
	}
	return info
}

// Disconnect ends the connection of clientID (MQTT 5: DISCONNECT 0x98
// administrative action) and returns within Options.DisconnectTimeout,
// even if the client does not read. A terminal may log in again at once;
// disable it in the key service to keep it out.
func (h *Hook) Disconnect(clientID string) error { return h.DisconnectBy(clientID, "") }

// DisconnectBy is Disconnect on behalf of operator (the name of the admin
// API's token), which the session_ended event names.
func (h *Hook) DisconnectBy(clientID, operator string) error {
	cl, ok := h.server.Clients.Get(clientID)
	if !ok || cl.Closed() {
		return ErrNoSession
	}
	s := h.session(cl)
	if s == nil || s.state.Load() != stateEstablished {
		return ErrNoSession
	}
	h.writer.markEndingBy(s, "administrative", operator)
	h.writer.endConnection(cl, packets.ErrAdministrativeAction) // even if the hook is ending it already
	return nil
}
