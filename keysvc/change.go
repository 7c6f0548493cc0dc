package keysvc

import (
	"context"
	"fmt"
	"time"

	"github.com/m2mguard/m2mguard/codec"
)

// ChangeRequest asks for a credential change (SPEC section 7).
type ChangeRequest struct {
	What   codec.What // pwd, bk or all
	Mode   codec.Mode // as the platform decided: cipher, or sms (needs an MSISDN)
	Origin string     // OriginTerminal, OriginOperator or OriginExpiry; "" = OriginOperator
}

// Expired reports whether the change has passed its deadline at now.
func (c *Change) Expired(now time.Time) bool { return !now.Before(c.Deadline) }

// dropExpired removes a pending change past its deadline and reports
// whether it did.
func dropExpired(t *Terminal, now time.Time) bool {
	if t.Pending != nil && t.Pending.Expired(now) {
		t.Pending = nil
		return true
	}
	return false
}

// StartChange stores a new pending change of sn with fresh values for what
// changes (the others copied from the current credentials), a random rid
// and a deadline. ErrBusy if a change is pending and not past its deadline;
// one past it is dropped first. ErrInactive for a disabled terminal.
func (s *Service) StartChange(ctx context.Context, sn string, r ChangeRequest) (*Change, error) {
	switch r.What {
	case codec.WhatPwd, codec.WhatBK, codec.WhatAll:
	default:
		return nil, fmt.Errorf("keysvc: start change %s: %w: what must be pwd, bk or all", safeSN(sn), ErrInvalid)
	}
	if r.Mode != codec.ModeCipher && r.Mode != codec.ModeSMS {
		return nil, fmt.Errorf("keysvc: start change %s: %w: mode must be cipher or sms", safeSN(sn), ErrInvalid)
	}
	switch r.Origin {
	case "":
		r.Origin = OriginOperator
	case OriginTerminal, OriginOperator, OriginExpiry:
	default:
		return nil, fmt.Errorf("keysvc: start change %s: %w: unknown origin", safeSN(sn), ErrInvalid)
	}
	t, err := s.update(ctx, sn, OpChangeStart, func(t *Terminal) error {
		if t.Status != StatusActive {
			return ErrInactive
		}
		now := s.now1()
		dropExpired(t, now)
		if t.Pending != nil {
			return ErrBusy
		}
		if r.Mode == codec.ModeSMS && t.MSISDN == "" {
			return fmt.Errorf("%w: sms mode needs an msisdn", ErrInvalid)
		}
		rid, err := s.newID()
		if err != nil {
			return err
		}
		for rid == t.LastCommitted {
			if rid, err = s.newID(); err != nil {
				return err
			}
		}
		c := &Change{RID: rid, What: r.What, Mode: r.Mode, Origin: r.Origin,
			New: t.Creds.Clone(), Started: now, Deadline: now.Add(s.deadline)}
		if err := s.newCreds(&c.New, r.What, now); err != nil {
			return err
		}
		t.Pending = c
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("keysvc: start change %s: %w", safeSN(sn), err)
	}
	return t.Pending.Clone(), nil
}

// CommitChange makes the pending change rid current, atomically: new
// values current, old ones void, LastCommitted = rid. It is idempotent:
// committing the rid that was committed last returns the record and no
// error, so concurrent commits of one rid (an ack and a login, or two
// nodes) all succeed and the store is written once. ErrUnknownRID for any
// other rid, and for a change past its deadline (which is dropped).
// ErrInactive for a disabled terminal: nothing commits while an operator
// has it disabled (disabling cancels the pending change anyway).
func (s *Service) CommitChange(ctx context.Context, sn string, rid codec.ID) (*Terminal, error) {
	t, err := s.update(ctx, sn, OpCommit, func(t *Terminal) error {
		if t.Status != StatusActive {
			return ErrInactive
		}
		if rid != 0 && t.LastCommitted == rid {
			return errSkip
		}
		if t.Pending == nil || t.Pending.RID != rid {
			if dropExpired(t, s.now1()) {
				return writeThen{ErrUnknownRID}
			}
			return ErrUnknownRID
		}
		if dropExpired(t, s.now1()) {
			return writeThen{ErrUnknownRID}
		}
		t.Creds = t.Pending.New
		t.Pending = nil
		t.LastCommitted = rid
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("keysvc: commit %s %s: %w", safeSN(sn), rid, err)
	}
	return t, nil
}

// MarkDelivered records that the new values of change rid were sent, and
// by which mode (the platform decides it when it delivers, which for an
// offline terminal is after its next login): a cfg published or an SMS
// handed to the gateway. ErrUnknownRID if rid is not pending, ErrInactive
// for a disabled terminal.
func (s *Service) MarkDelivered(ctx context.Context, sn string, rid codec.ID, mode codec.Mode) (*Terminal, error) {
	if mode != codec.ModeCipher && mode != codec.ModeSMS {
		return nil, fmt.Errorf("keysvc: mark delivered %s: %w: mode must be cipher or sms", safeSN(sn), ErrInvalid)
	}
	t, err := s.update(ctx, sn, OpDelivered, func(t *Terminal) error {
		if t.Status != StatusActive {
			return ErrInactive
		}
		if dropExpired(t, s.now1()) {
			return writeThen{ErrUnknownRID}
		}
		if t.Pending == nil || t.Pending.RID != rid {
			return ErrUnknownRID
		}
		if t.Pending.Delivered && t.Pending.Mode == mode {
			return errSkip
		}
		if mode == codec.ModeSMS && t.MSISDN == "" {
			return fmt.Errorf("%w: sms mode needs an msisdn", ErrInvalid)
		}
		t.Pending.Delivered, t.Pending.Mode = true, mode
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("keysvc: mark delivered %s %s: %w", safeSN(sn), rid, err)
	}
	return t, nil
}

// ExpireChange drops the pending change of sn if it has passed its
// deadline, keeping the old values, and reports whether it did.
func (s *Service) ExpireChange(ctx context.Context, sn string) (bool, error) {
	dropped := false
	_, err := s.update(ctx, sn, OpExpire, func(t *Terminal) error {
		dropped = dropExpired(t, s.now1())
		if !dropped {
			return errSkip
		}
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("keysvc: expire change %s: %w", safeSN(sn), err)
	}
	return dropped, nil
}

// Match is the outcome of MatchUplink.
type Match int

// The outcomes of MatchUplink.
const (
	MatchNone    Match = iota // neither the current nor a pending password verifies
	MatchCurrent              // the current up password verifies
	MatchPending              // the pending change's new up verifies: commit it (SPEC section 7)
)

// String returns "none", "current" or "pending".
func (m Match) String() string {
	switch m {
	case MatchCurrent:
		return "current"
	case MatchPending:
		return "pending"
	}
	return "none"
}

// MatchUplink runs verify (typically a codec.Login's Verify) against the
// current uplink password and, when a change is pending, against the
// pending new one: both always run, so the work does not tell which
// matched. The current password wins; MatchPending only for a change that
// replaces the passwords. Use a record from Service.Lookup, which leaves
// out a change past its deadline.
func (t *Terminal) MatchUplink(verify func(up []byte) bool) Match {
	cur := verify(t.Creds.Up)
	pend := false
	if t.Pending != nil {
		pend = verify(t.Pending.New.Up) && t.Pending.What.Passwords()
	}
	switch {
	case cur:
		return MatchCurrent
	case pend:
		return MatchPending
	}
	return MatchNone
}
