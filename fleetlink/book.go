package fleetlink

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/fleet"
	"github.com/m2mguard/m2mguard/hook"
)

// book is the hook's ChangeBook in the fleet's bucket M2MGUARD_CHANGES:
//
//	deadline.<sn>        sn's pending change: {"rid": change id, "deadline": unix ms}
//	sms.<sn>.<rid>       an SMS send in progress: {"owner": broker, "deadline": unix ms}
//
// Writes go out in order on one worker (the login path never waits for
// NATS) and are retried while NATS does not answer. One broker at a time,
// the holder of the lease "change-work", collects the expired changes of
// the whole fleet (handed to its hook by Due) and takes over the SMS
// sends of brokers that are gone (hook.ResumeSMS).
type book struct {
	l  *Link
	kv jetstream.KeyValue
	q  *queue[bookOp]

	lease *fleet.Lease // set by start

	mu  sync.Mutex
	due []hook.DueChange // expired changes collected by the sweep, for Due
}

// bookOp is one write of the book: a put, or a delete if value is nil.
type bookOp struct {
	key   string
	value []byte
}

// changeWorkLease is the lease of the fleet-wide change work.
const changeWorkLease = "change-work"

func newBook(l *Link, kv jetstream.KeyValue) *book {
	return &book{l: l, kv: kv, q: newQueue[bookOp]()}
}

func deadlineKey(sn string) (string, error) {
	k, err := fleet.EscapeKey(sn)
	return "deadline." + k, err
}

func smsKey(sn string, rid codec.ID) (string, error) {
	k, err := fleet.EscapeKey(sn)
	return "sms." + k + "." + rid.String(), err
}

// deadlineValue is the value of a deadline key.
type deadlineValue struct {
	RID      string `json:"rid"`
	Deadline int64  `json:"deadline"` // unix milliseconds
}

// smsValue is the value of an sms key.
type smsValue struct {
	Owner    string `json:"owner"`
	Deadline int64  `json:"deadline"` // unix milliseconds
}

// Watch records the deadline of sn's pending change rid (hook.ChangeBook).
func (b *book) Watch(sn string, rid codec.ID, deadline time.Time) {
	if k, err := deadlineKey(sn); err == nil {
		v, _ := json.Marshal(deadlineValue{RID: rid.String(), Deadline: deadline.UnixMilli()})
		b.q.push(bookOp{k, v})
	}
}

// Forget drops the deadline of sn's change (hook.ChangeBook).
func (b *book) Forget(sn string) {
	if k, err := deadlineKey(sn); err == nil {
		b.q.push(bookOp{key: k})
	}
}

// Due hands over the expired changes the sweep collected (hook.ChangeBook):
// only on the holder of the lease.
func (b *book) Due(now time.Time) []hook.DueChange {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := b.due
	b.due = nil
	return out
}

// SMSStarted records this broker's send of change rid's SMS (hook.ChangeBook).
func (b *book) SMSStarted(sn string, rid codec.ID, deadline time.Time) {
	k, err := smsKey(sn, rid)
	if err != nil {
		return
	}
	v, _ := json.Marshal(smsValue{Owner: b.l.id, Deadline: deadline.UnixMilli()})
	b.q.push(bookOp{k, v})
}

// SMSEnded drops the send of change rid's SMS (hook.ChangeBook).
func (b *book) SMSEnded(sn string, rid codec.ID) {
	if k, err := smsKey(sn, rid); err == nil {
		b.q.push(bookOp{key: k})
	}
}

// start runs the writer and competes for the lease (Attach).
func (b *book) start() error {
	b.l.goRun(func() { b.q.run(b.l.ctx, b.write) })
	lease, err := b.l.f.Lease(changeWorkLease, fleet.LeaseOptions{})
	if err != nil {
		return err
	}
	b.l.addStop(lease.Stop)
	b.lease = lease
	b.l.goRun(func() { b.sweeper(lease) })
	return nil
}

// drain waits until the queued writes are done, or timeout (Close).
func (b *book) drain(timeout time.Duration) { b.q.waitEmpty(timeout) }

// write applies one op, retrying while NATS does not answer, until Close.
func (b *book) write(op bookOp) {
	for wait := 100 * time.Millisecond; ; wait = min(2*wait, 5*time.Second) {
		ctx, cancel := context.WithTimeout(b.l.ctx, 5*time.Second)
		var err error
		if op.value == nil {
			err = b.kv.Delete(ctx, op.key)
		} else {
			_, err = b.kv.Put(ctx, op.key, op.value)
		}
		cancel()
		if err == nil || isGone(err) || b.l.ctx.Err() != nil {
			return
		}
		b.l.m.failures.WithLabelValues("book").Inc()
		select {
		case <-b.l.ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// sweeper does the fleet-wide change work every SweepEvery while this
// broker holds the lease.
func (b *book) sweeper(lease *fleet.Lease) {
	t := time.NewTicker(b.l.o.SweepEvery)
	defer t.Stop()
	for {
		select {
		case <-b.l.ctx.Done():
			return
		case <-t.C:
		}
		if lease.Held() {
			b.sweep()
		}
	}
}

// sweep collects the expired changes and takes over the orphaned SMS
// sends.
func (b *book) sweep() {
	ctx, cancel := context.WithTimeout(b.l.ctx, b.l.o.SweepEvery)
	defer cancel()
	if err := b.collectExpired(ctx); err != nil && b.l.ctx.Err() == nil {
		b.l.m.failures.WithLabelValues("book").Inc()
		b.l.log.Warn("fleet: change expiry sweep", "error", err)
	}
	if err := b.adoptSMS(ctx); err != nil && b.l.ctx.Err() == nil {
		b.l.m.failures.WithLabelValues("book").Inc()
		b.l.log.Warn("fleet: SMS send takeover", "error", err)
	}
}

// keys lists the book's keys under prefix ("deadline." or "sms.").
func (b *book) keys(ctx context.Context, prefix string) ([]string, error) {
	lister, err := b.kv.ListKeysFiltered(ctx, prefix+">")
	if err != nil {
		if errors.Is(err, jetstream.ErrNoKeysFound) {
			return nil, nil
		}
		return nil, err
	}
	defer lister.Stop()
	var out []string
	for k := range lister.Keys() {
		out = append(out, k)
	}
	return out, nil
}

// collectExpired removes the deadlines that have passed and queues their
// terminals for Due. Each removal is a check-and-set: of two sweepers (a
// lease changing hands) one gets each change.
func (b *book) collectExpired(ctx context.Context) error {
	keys, err := b.keys(ctx, "deadline.")
	if err != nil {
		return err
	}
	now := time.Now()
	for _, k := range keys {
		e, err := b.kv.Get(ctx, k)
		if isGone(err) {
			continue
		}
		if err != nil {
			return err
		}
		var v deadlineValue
		verr := json.Unmarshal(e.Value(), &v)
		if verr == nil && now.Before(time.UnixMilli(v.Deadline)) {
			continue
		}
		sn, kerr := fleet.UnescapeKey(strings.TrimPrefix(k, "deadline."))
		if err := b.kv.Delete(ctx, k, jetstream.LastRevision(e.Revision())); err != nil || kerr != nil || codec.ValidateSN(sn) != nil {
			continue // changed meanwhile (a newer change), or not a serial number
		}
		rid, _ := codec.ParseID(v.RID) // an unreadable value: the expiry is recorded without its id
		b.mu.Lock()
		b.due = append(b.due, hook.DueChange{SN: sn, RID: rid})
		b.mu.Unlock()
	}
	return nil
}

// adoptSMS takes over the SMS sends whose broker is gone; the hook's send
// then records itself as this broker's. A send past its deadline, or
// whose change is no longer pending, is dropped.
func (b *book) adoptSMS(ctx context.Context) error {
	keys, err := b.keys(ctx, "sms.")
	if err != nil || len(keys) == 0 {
		return err
	}
	live, err := b.l.f.Brokers(ctx)
	if err != nil || len(live) == 0 {
		return err // not even this broker: the liveness bucket does not answer
	}
	for _, k := range keys {
		e, err := b.kv.Get(ctx, k)
		if isGone(err) {
			continue
		}
		if err != nil {
			return err
		}
		sn, rid, v, err := parseSMSEntry(k, e.Value())
		switch {
		case err != nil || time.Now().After(time.UnixMilli(v.Deadline)):
			_ = b.kv.Delete(ctx, k, jetstream.LastRevision(e.Revision()))
			continue
		case slices.Contains(live, v.Owner):
			continue // its broker is sending it
		}
		resumed, err := b.l.hook.ResumeSMS(ctx, sn, rid)
		switch {
		case err != nil:
			b.l.log.Warn("fleet: SMS send not taken over (tried again at the next sweep)", "sn", sn, "rid", rid.String(), "error", err)
		case !resumed:
			_ = b.kv.Delete(ctx, k, jetstream.LastRevision(e.Revision()))
		default:
			b.l.log.Info("m2mguard fleet_sms_taken_over", "event", "fleet_sms_taken_over", "sn", sn, "rid", rid.String(), "from", v.Owner)
		}
	}
	return nil
}

// parseSMSEntry parses an sms key and its value, bounded.
func parseSMSEntry(key string, value []byte) (string, codec.ID, smsValue, error) {
	var v smsValue
	rest, ok := strings.CutPrefix(key, "sms.")
	esc, ridText, ok2 := strings.Cut(rest, ".")
	if !ok || !ok2 || len(value) > 512 {
		return "", 0, v, fmt.Errorf("%w: sms key %q", errRequest, key)
	}
	sn, err := fleet.UnescapeKey(esc)
	if err != nil || codec.ValidateSN(sn) != nil {
		return "", 0, v, fmt.Errorf("%w: sms key %q", errRequest, key)
	}
	rid, err := codec.ParseID(ridText)
	if err != nil {
		return "", 0, v, fmt.Errorf("%w: sms key %q", errRequest, key)
	}
	if err := json.Unmarshal(value, &v); err != nil || v.Owner == "" {
		return "", 0, v, fmt.Errorf("%w: sms value", errRequest)
	}
	return sn, rid, v, nil
}
