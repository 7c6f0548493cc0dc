package fleetlink

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"time"

	"github.com/m2mguard/m2mguard/broker/admin"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/fleet"
	"github.com/m2mguard/m2mguard/hook"
	"github.com/m2mguard/m2mguard/keysvc"
)

// Sessions is the admin API's view of the fleet's sessions
// (admin.Sessions and admin.FleetSessions): the list of every broker, and
// disconnects, revocations and change starts that reach the broker
// holding the session.
type Sessions struct{ l *Link }

var (
	_ admin.Sessions      = (*Sessions)(nil)
	_ admin.FleetSessions = (*Sessions)(nil)
)

// Timeouts of the admin calls that wait for other brokers.
const (
	listTimeout    = 3 * time.Second // the whole list
	requestTimeout = 5 * time.Second // a disconnect or change start on the holder
	lookupTimeout  = 2 * time.Second // a directory lookup
	pageSize       = 1000            // sessions per reply: well inside NATS's 1 MiB payload
)

// Sessions is the fleet's session list without its warnings.
func (s *Sessions) Sessions() []hook.SessionInfo {
	ctx, cancel := context.WithTimeout(context.Background(), listTimeout)
	defer cancel()
	list, _ := s.FleetSessions(ctx)
	return list
}

// FleetSessions gathers the sessions of every live broker, each with its
// broker, sorted by ClientID. A ClientID two brokers list (a takeover
// under way) is listed once, with the later session. The warnings name
// the brokers that did not answer, or say that the fleet is unreachable
// and the list is this broker's alone.
func (s *Sessions) FleetSessions(ctx context.Context) ([]hook.SessionInfo, []string) {
	l := s.l
	ctx, cancel := context.WithTimeout(ctx, listTimeout)
	defer cancel()
	out := l.localSessions("", 0)
	brokers, err := l.f.Brokers(ctx)
	if err != nil {
		l.m.failures.WithLabelValues("gather").Inc()
		return out, []string{fmt.Sprintf("the fleet is unreachable (%v): the list holds broker %s's sessions only", err, l.id)}
	}
	type result struct {
		broker   string
		sessions []hook.SessionInfo
		err      error
	}
	results := make(chan result, len(brokers))
	asked := 0
	for _, b := range brokers {
		if b == l.id {
			continue
		}
		asked++
		go func() {
			list, err := s.remoteSessions(ctx, b)
			results <- result{b, list, err}
		}()
	}
	var warnings []string
	for range asked {
		r := <-results
		if r.err != nil {
			l.m.failures.WithLabelValues("gather").Inc()
			warnings = append(warnings, fmt.Sprintf("broker %s did not answer (%v): its sessions are missing", r.broker, r.err))
			continue
		}
		out = append(out, r.sessions...)
	}
	sort.Strings(warnings)
	return onePerClientID(out), warnings
}

// remoteSessions pages through broker b's sessions.
func (s *Sessions) remoteSessions(ctx context.Context, b string) ([]hook.SessionInfo, error) {
	var all []hook.SessionInfo
	after := ""
	for {
		req, _ := json.Marshal(sessionsRequest{After: after, Limit: pageSize})
		data, err := s.l.f.Request(ctx, b, methodSessions, req)
		if err != nil {
			return all, err
		}
		rep, err := decodeSessionsReply(data)
		if err != nil {
			return all, err
		}
		for i := range rep.Sessions {
			rep.Sessions[i].Broker = b
		}
		all = append(all, rep.Sessions...)
		if !rep.More || len(rep.Sessions) == 0 {
			return all, nil
		}
		after = rep.Sessions[len(rep.Sessions)-1].ClientID
	}
}

// onePerClientID sorts list by ClientID and keeps, of a ClientID listed
// more than once, the session established last.
func onePerClientID(list []hook.SessionInfo) []hook.SessionInfo {
	sort.SliceStable(list, func(i, j int) bool {
		if list[i].ClientID != list[j].ClientID {
			return list[i].ClientID < list[j].ClientID
		}
		return list[i].Since.After(list[j].Since)
	})
	return slices.CompactFunc(list, func(a, b hook.SessionInfo) bool { return a.ClientID == b.ClientID })
}

// localSessions is this broker's sessions after the ClientID after, at
// most limit of them (0: all), each naming this broker.
func (l *Link) localSessions(after string, limit int) []hook.SessionInfo {
	all := l.hook.Sessions() // sorted by ClientID
	list := all[sort.Search(len(all), func(i int) bool { return all[i].ClientID > after }):]
	if limit > 0 && len(list) > limit {
		list = list[:limit]
	}
	for i := range list {
		list[i].Broker = l.id
	}
	return list
}

// DisconnectBy ends the connection of clientID on whichever broker holds
// it, for operator (named in the hook's event there).
// hook.ErrNoSession if none does; an error wrapping
// admin.ErrBrokerUnreachable names the broker that holds it and did not
// answer.
func (s *Sessions) DisconnectBy(clientID, operator string) error {
	l := s.l
	err := l.hook.DisconnectBy(clientID, operator)
	if !errors.Is(err, hook.ErrNoSession) {
		return err
	}
	holder, err := s.holder(clientID)
	if err != nil || holder == "" {
		return err
	}
	req, _ := json.Marshal(disconnectRequest{ClientID: clientID, Operator: operator})
	ctx, cancel := context.WithTimeout(l.ctx, requestTimeout)
	defer cancel()
	data, err := l.f.Request(ctx, holder, methodDisconnect, req)
	if err != nil {
		l.m.failures.WithLabelValues("request").Inc()
		return fmt.Errorf("%w: broker %s holds the session of %s and did not answer (%v)", admin.ErrBrokerUnreachable, holder, clientID, err)
	}
	var rep errorReply
	if err := decodeReply(data, &rep); err != nil {
		return err
	}
	return rep.err()
}

// holder returns the broker that holds clientID's session if it is another
// one, "" if none or this one (hook.ErrNoSession then).
func (s *Sessions) holder(clientID string) (string, error) {
	ctx, cancel := context.WithTimeout(s.l.ctx, lookupTimeout)
	defer cancel()
	e, ok, err := s.l.f.Directory().Lookup(ctx, clientID)
	switch {
	case err != nil:
		s.l.m.failures.WithLabelValues("request").Inc()
		return "", fmt.Errorf("%w: %s is not connected to this broker, and the fleet's directory is unreachable (%v)", admin.ErrBrokerUnreachable, clientID, err)
	case !ok || e.Broker == s.l.id:
		return "", hook.ErrNoSession
	}
	return e.Broker, nil
}

// RevokeBy ends terminal sn's sessions on every broker (disable, delete,
// rekey; operator asked for it) and returns how many ended. A broker that
// does not answer ends them when the revocation reaches it on the stream.
func (s *Sessions) RevokeBy(sn, reason, operator string) int {
	return s.l.hook.RevokeBy(sn, reason, operator) + s.l.notes.revoke(sn, reason, operator)
}

// StartChangeBy starts operator's change for terminal sn on the broker
// holding its session, so that the new values reach it at once; a
// terminal connected nowhere gets them at its next login, wherever. An
// error wrapping admin.ErrBrokerUnreachable names the holder that did not
// answer: the change was not started.
func (s *Sessions) StartChangeBy(ctx context.Context, sn string, what codec.What, operator string) (*keysvc.Change, error) {
	l := s.l
	holder, err := s.holder(sn)
	if errors.Is(err, admin.ErrBrokerUnreachable) {
		l.log.Warn("fleet: directory unreachable: the change starts here and reaches the terminal at its next login", "sn", sn, "error", err)
	}
	if holder == "" {
		return l.hook.StartChangeBy(ctx, sn, what, operator)
	}
	req, _ := json.Marshal(changeRequest{SN: sn, What: string(what), Operator: operator})
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	data, err := l.f.Request(rctx, holder, methodChangeStart, req)
	if err != nil {
		l.m.failures.WithLabelValues("request").Inc()
		return nil, fmt.Errorf("%w: broker %s holds terminal %s's session and did not answer (%v): no change was started", admin.ErrBrokerUnreachable, holder, sn, err)
	}
	var rep changeReply
	if err := decodeReply(data, &rep); err != nil {
		return nil, err
	}
	if err := rep.err(); err != nil {
		return nil, err
	}
	if rep.Change == nil {
		return nil, fmt.Errorf("%w: change-start answer without a change", errRequest)
	}
	return rep.Change.change(), nil
}

// serve handles the other brokers' calls until Close (Attach).
func (l *Link) serve() error {
	handlers := map[string]fleet.Handler{
		methodInvalidate: func(_ context.Context, req []byte) ([]byte, error) {
			e, err := decodeEvent(req, fleet.EventInvalidate)
			if err != nil {
				return nil, err
			}
			l.notes.invalidate(e)
			return nil, nil
		},
		methodRevoke: func(_ context.Context, req []byte) ([]byte, error) {
			e, err := decodeEvent(req, fleet.EventRevoke)
			if err != nil {
				return nil, err
			}
			return json.Marshal(revokeReply{Ended: l.notes.applyRevoke(e, true)})
		},
		methodSessions: func(_ context.Context, req []byte) ([]byte, error) {
			r, err := decodeSessionsRequest(req)
			if err != nil {
				return nil, err
			}
			page := l.localSessions(r.After, r.Limit+1)
			more := len(page) > r.Limit
			if more {
				page = page[:r.Limit]
			}
			return json.Marshal(sessionsReply{Sessions: page, More: more})
		},
		methodDisconnect: func(_ context.Context, req []byte) ([]byte, error) {
			var r disconnectRequest
			if err := decodeRequest(req, &r); err != nil || r.ClientID == "" {
				return nil, fmt.Errorf("%w: disconnect", errRequest)
			}
			return json.Marshal(errorReplyOf(l.hook.DisconnectBy(r.ClientID, r.Operator)))
		},
		methodChangeStart: func(ctx context.Context, req []byte) ([]byte, error) {
			var r changeRequest
			if err := decodeRequest(req, &r); err != nil || codec.ValidateSN(r.SN) != nil {
				return nil, fmt.Errorf("%w: change-start", errRequest)
			}
			ch, err := l.hook.StartChangeBy(ctx, r.SN, codec.What(r.What), r.Operator)
			rep := changeReply{errorReply: errorReplyOf(err)}
			if err == nil {
				rep.Change = metaOf(ch)
			}
			return json.Marshal(rep)
		},
	}
	for method, h := range handlers {
		stop, err := l.f.Handle(method, h)
		if err != nil {
			return err
		}
		l.addStop(stop)
	}
	return nil
}

// The requests and replies between brokers. None carries a secret: a
// change's reply has its metadata, never its new values.
type (
	sessionsRequest struct {
		After string `json:"after,omitempty"`
		Limit int    `json:"limit"`
	}
	sessionsReply struct {
		Sessions []hook.SessionInfo `json:"sessions"`
		More     bool               `json:"more,omitempty"`
	}
	disconnectRequest struct {
		ClientID string `json:"client_id"`
		Operator string `json:"operator,omitempty"` // who asked, for the hook's event
	}
	changeRequest struct {
		SN       string `json:"sn"`
		What     string `json:"what"`
		Operator string `json:"operator,omitempty"`
	}
	changeReply struct {
		errorReply
		Change *changeMeta `json:"change,omitempty"`
	}
	// changeMeta is a keysvc.Change without its new values.
	changeMeta struct {
		RID       string    `json:"rid"`
		What      string    `json:"what"`
		Mode      string    `json:"mode"`
		Origin    string    `json:"origin"`
		Started   time.Time `json:"started"`
		Deadline  time.Time `json:"deadline"`
		Delivered bool      `json:"delivered"`
	}
)

// errorReply carries a remote call's error: its kind, so that the caller
// gets the same sentinel, and its text.
type errorReply struct {
	Code    string `json:"code,omitempty"`
	Message string `json:"message,omitempty"`
}

// The sentinels an errorReply carries by Code.
var replyCodes = []struct {
	code string
	err  error
}{
	{"no-session", hook.ErrNoSession},
	{"not-found", keysvc.ErrNotFound},
	{"busy", keysvc.ErrBusy},
	{"inactive", keysvc.ErrInactive},
	{"invalid", keysvc.ErrInvalid},
	{"conflict", keysvc.ErrConflict},
	{"unavailable", keysvc.ErrUnavailable},
	{"forbidden", keysvc.ErrForbidden},
}

func errorReplyOf(err error) errorReply {
	if err == nil {
		return errorReply{}
	}
	r := errorReply{Code: "error", Message: err.Error()}
	for _, c := range replyCodes {
		if errors.Is(err, c.err) {
			r.Code = c.code
			break
		}
	}
	return r
}

// remoteError is the error of another broker, with the sentinel of its
// kind.
type remoteError struct {
	msg      string
	sentinel error
}

func (e *remoteError) Error() string { return e.msg }
func (e *remoteError) Unwrap() error { return e.sentinel }

func (r errorReply) err() error {
	if r.Code == "" {
		return nil
	}
	e := &remoteError{msg: r.Message}
	for _, c := range replyCodes {
		if c.code == r.Code {
			e.sentinel = c.err
		}
	}
	if e.msg == "" {
		e.msg = "error on another broker"
	}
	return e
}

func metaOf(ch *keysvc.Change) *changeMeta {
	return &changeMeta{RID: ch.RID.String(), What: string(ch.What), Mode: string(ch.Mode), Origin: ch.Origin,
		Started: ch.Started, Deadline: ch.Deadline, Delivered: ch.Delivered}
}

func (m *changeMeta) change() *keysvc.Change {
	rid, _ := codec.ParseID(m.RID)
	return &keysvc.Change{RID: rid, What: codec.What(m.What), Mode: codec.Mode(m.Mode), Origin: m.Origin,
		Started: m.Started, Deadline: m.Deadline, Delivered: m.Delivered}
}

// maxSessionsReply bounds a page of sessions before it is decoded.
const maxSessionsReply = 1 << 20

// decodeRequest parses a small request, bounded.
func decodeRequest(data []byte, v any) error {
	if len(data) > maxRequest {
		return fmt.Errorf("%w: %d bytes", errRequest, len(data))
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("%w: %w", errRequest, err)
	}
	return nil
}

// decodeReply parses a small reply, bounded.
func decodeReply(data []byte, v any) error {
	if err := decodeRequest(data, v); err != nil {
		return fmt.Errorf("fleetlink: reply: %w", err)
	}
	return nil
}

// decodeSessionsRequest parses a sessions request; the limit is at most
// pageSize.
func decodeSessionsRequest(data []byte) (sessionsRequest, error) {
	var r sessionsRequest
	if err := decodeRequest(data, &r); err != nil {
		return r, err
	}
	if r.Limit <= 0 || r.Limit > pageSize || len(r.After) > fleet.MaxKeyInput {
		return sessionsRequest{}, fmt.Errorf("%w: sessions limit %d", errRequest, r.Limit)
	}
	return r, nil
}

// decodeSessionsReply parses a page of sessions, bounded.
func decodeSessionsReply(data []byte) (sessionsReply, error) {
	var r sessionsReply
	if len(data) > maxSessionsReply {
		return r, fmt.Errorf("%w: sessions reply of %d bytes", errRequest, len(data))
	}
	if err := json.Unmarshal(data, &r); err != nil {
		return sessionsReply{}, fmt.Errorf("%w: sessions reply: %w", errRequest, err)
	}
	if len(r.Sessions) > pageSize || slices.ContainsFunc(r.Sessions, func(s hook.SessionInfo) bool { return s.ClientID == "" }) {
		return sessionsReply{}, fmt.Errorf("%w: sessions reply", errRequest)
	}
	return r, nil
}
