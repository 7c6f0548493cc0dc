package main

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/internal/rawmqtt"
)

// rawTerminal is a terminal on a raw MQTT 3.1.1 connection, one goroutine
// per connection: much lighter than the reference client, for tests with
// a thousand terminals. It does what firmware must for a change the
// platform starts (SPEC section 7): it logs in asking for a session key
// (so that its basic key is in sync and changes go in ciphertext),
// subscribes to its key topic, applies a cfg, acknowledges it with the new
// uplink password, and takes the new values when done verifies with the
// new downlink password.
type rawTerminal struct {
	id  codec.Identity
	alg codec.Alg

	mu   sync.Mutex
	cur  rawCreds
	next *rawCreds // the values of a cfg, until done
	rid  codec.ID

	rids      map[codec.ID]bool // the changes delivered (cfg), by rid
	changes   atomic.Int32      // cfg messages received (changes delivered, a change delivered again counted again)
	committed atomic.Int32      // changes committed: done verified, or a login with the new values accepted
}

type rawCreds struct {
	up, down, bk []byte
	bkexp        uint32
}

// rawTerminalCSV returns n terminals SN prefix + 4 digits with random
// secrets, and the import CSV that registers them.
func rawTerminalCSV(t *testing.T, prefix string, n int) ([]*rawTerminal, []byte) {
	t.Helper()
	var csv bytes.Buffer
	csv.WriteString("sn,imei,imsi,up,down,bk\n")
	terms := make([]*rawTerminal, n)
	for i := range terms {
		up, down, bk := randomPassword(), randomPassword(), make([]byte, 32)
		rand.Read(bk)
		rt := &rawTerminal{
			id:  codec.Identity{SN: fmt.Sprintf("%s%04d", prefix, i), IMEI: "354494040518570", IMSI: "460020084678120"},
			alg: codec.HS256,
			cur: rawCreds{up: up, down: down, bk: bk, bkexp: codec.Never},
		}
		terms[i] = rt
		fmt.Fprintf(&csv, "%s,%s,%s,%s,%s,%s\n", rt.id.SN, rt.id.IMEI, rt.id.IMSI, up, down, hex.EncodeToString(bk))
	}
	return terms, csv.Bytes()
}

func randomPassword() []byte {
	const abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 16)
	rand.Read(b)
	for i := range b {
		b[i] = abc[int(b[i])%len(abc)]
	}
	return b
}

func randomID() codec.ID {
	var b [8]byte
	for {
		rand.Read(b[:])
		if id := codec.ID(binary.BigEndian.Uint64(b[:])); id != 0 {
			return id
		}
	}
}

// secrets returns the terminal's current and pending secrets, for scans.
func (rt *rawTerminal) secrets() [][]byte {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	out := [][]byte{rt.cur.up, rt.cur.down, rt.cur.bk}
	if rt.next != nil {
		out = append(out, rt.next.up, rt.next.down, rt.next.bk)
	}
	return out
}

// rawConn is one MQTT 3.1.1 connection, encoded and decoded by mochi's
// packets package.
type rawConn struct {
	conn net.Conn
	r    *bufio.Reader
	id   uint16
}

func (c *rawConn) write(pk packets.Packet) error {
	var buf bytes.Buffer
	if err := rawmqtt.Encode(&buf, &pk); err != nil {
		return err
	}
	c.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, err := c.conn.Write(buf.Bytes())
	return err
}

func (c *rawConn) read(timeout time.Duration) (packets.Packet, error) {
	if timeout > 0 {
		c.conn.SetReadDeadline(time.Now().Add(timeout))
	} else {
		c.conn.SetReadDeadline(time.Time{})
	}
	return rawmqtt.Read(c.r, 4, 1<<16)
}

// errRefused: the broker refused the login.
var errRefused = errors.New("login refused")

// login connects to addr, with the current values or, if the broker
// refuses them while a change is pending here (its done was lost), with
// the new ones, which then become current: as the reference client does.
func (rt *rawTerminal) login(addr string) (*rawConn, error) {
	rt.mu.Lock()
	cur, next := rt.cur, rt.next
	rt.mu.Unlock()
	c, err := rt.loginWith(addr, cur)
	if !errors.Is(err, errRefused) || next == nil {
		return c, err
	}
	if c, err = rt.loginWith(addr, *next); err == nil {
		rt.mu.Lock()
		if rt.next != nil {
			rt.cur, rt.next = *rt.next, nil
			rt.committed.Add(1)
		}
		rt.mu.Unlock()
	}
	return c, err
}

// distinctChanges is the number of different changes delivered.
func (rt *rawTerminal) distinctChanges() int {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	return len(rt.rids)
}

// loginWith connects to addr with a fresh token of cur (asking for a
// session key with its basic key) and subscribes to the key topic.
func (rt *rawTerminal) loginWith(addr string, cur rawCreds) (*rawConn, error) {
	l := codec.Login{Identity: rt.id, Alg: rt.alg, Flags: codec.FlagSessionKey, TS: uint32(time.Now().Unix()), Nonce: randomID(),
		BKD: codec.BasicKeyDigest(rt.alg, cur.bk, cur.bkexp)}
	pw, err := l.Sign(cur.up)
	if err != nil {
		return nil, err
	}
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	c := &rawConn{conn: conn, r: bufio.NewReader(conn)}
	fail := func(err error) (*rawConn, error) { conn.Close(); return nil, err }
	err = c.write(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 120,
			ClientIdentifier: rt.id.SN, UsernameFlag: true, Username: []byte(rt.id.Username()), PasswordFlag: true, Password: pw}})
	if err != nil {
		return fail(err)
	}
	ack, err := c.read(30 * time.Second)
	if err != nil {
		return fail(err)
	}
	if ack.FixedHeader.Type != packets.Connack || ack.ReasonCode != 0 {
		return fail(fmt.Errorf("%w: 0x%02x", errRefused, ack.ReasonCode))
	}
	c.id = 1
	if err := c.write(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, ProtocolVersion: 4,
		PacketID: c.id, Filters: packets.Subscriptions{{Filter: codec.KeyTopic(rt.id.SN)}}}); err != nil {
		return fail(err)
	}
	return c, nil
}

// serve handles the connection until it ends: key-topic messages are
// acted on, everything else is read and dropped.
func (rt *rawTerminal) serve(c *rawConn) {
	defer c.conn.Close()
	for {
		pk, err := c.read(0)
		if err != nil {
			return
		}
		if pk.FixedHeader.Type != packets.Publish || pk.TopicName != codec.KeyTopic(rt.id.SN) {
			continue
		}
		if ack := rt.onKey(pk.Payload); ack != nil {
			c.id++
			if err := c.write(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, ProtocolVersion: 4,
				PacketID: c.id, TopicName: codec.CtlTopic(rt.id.SN), Payload: ack}); err != nil {
				return
			}
		}
	}
}

// onKey acts on a key-topic message and returns the ack to send, if any.
func (rt *rawTerminal) onKey(payload []byte) []byte {
	msg, err := codec.ParseControl(payload)
	if err != nil {
		return nil
	}
	rt.mu.Lock()
	defer rt.mu.Unlock()
	switch msg.Kind {
	case codec.KindCfg:
		if !msg.Verify(rt.id, rt.cur.down) {
			return nil
		}
		p, err := codec.UnwrapParams(rt.cur.bk, rt.id.SN, msg.RID, msg.Wrapped)
		if err != nil {
			return nil
		}
		next := rt.cur
		if p.What.Passwords() {
			next.up, next.down = p.Up, p.Down
		}
		if p.What.BasicKey() {
			next.bk, next.bkexp = p.BK, p.BKExp
		}
		rt.next, rt.rid = &next, msg.RID
		rt.changes.Add(1)
		if rt.rids == nil {
			rt.rids = map[codec.ID]bool{}
		}
		rt.rids[msg.RID] = true
		ack := codec.Control{Kind: codec.KindAck, Alg: rt.alg, RID: msg.RID, TS: uint32(time.Now().Unix()), Nonce: randomID()}
		if p.What.BasicKey() {
			ack.BKD = codec.BasicKeyDigest(rt.alg, next.bk, next.bkexp)
		}
		out, err := ack.Sign(rt.id, next.up)
		if err != nil {
			return nil
		}
		return out
	case codec.KindDone:
		if rt.next != nil && msg.RID == rt.rid && msg.Verify(rt.id, rt.next.down) {
			rt.cur, rt.next = *rt.next, nil
			rt.committed.Add(1)
		}
	}
	return nil
}

// online keeps the terminal connected to *addr (read again before each
// login: a restarted broker listens elsewhere) until stop is closed,
// logging in again after each connection ends. It returns when stop is
// closed; connected is closed after the first login.
func (rt *rawTerminal) online(addr *atomic.Pointer[string], stop <-chan struct{}, connected chan<- struct{}) {
	first := true
	for {
		select {
		case <-stop:
			return
		default:
		}
		c, err := rt.login(*addr.Load())
		if err != nil {
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Millisecond):
			}
			continue
		}
		if first {
			first = false
			close(connected)
		}
		done := make(chan struct{})
		go func() {
			select {
			case <-stop:
				c.conn.Close()
			case <-done:
			}
		}()
		rt.serve(c)
		close(done)
	}
}

// fleet runs terminals online and stops them.
type fleet struct {
	addr atomic.Pointer[string]
	stop chan struct{}
	wg   sync.WaitGroup
}

// goOnline connects every terminal of terms to addr, each kept online by
// its goroutine (logging in again whenever its connection ends), and
// waits until each has logged in once. The fleet stops at the test's end.
func goOnline(t *testing.T, addr string, terms []*rawTerminal) *fleet {
	t.Helper()
	f := &fleet{stop: make(chan struct{})}
	f.addr.Store(&addr)
	t.Cleanup(f.close)
	ready := make([]chan struct{}, len(terms))
	sem := make(chan struct{}, 64) // logins at once: the broker's throttle and netguard allow it
	for i, rt := range terms {
		ready[i] = make(chan struct{})
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			sem <- struct{}{}
			connected := make(chan struct{})
			go func() {
				select {
				case <-connected:
				case <-f.stop:
				}
				<-sem
				close(ready[i])
			}()
			rt.online(&f.addr, f.stop, connected)
		}()
	}
	deadline := time.After(120 * time.Second)
	for i, r := range ready {
		select {
		case <-r:
		case <-deadline:
			t.Fatalf("terminal %s did not log in within 2 minutes", terms[i].id.SN)
		}
	}
	return f
}

// moveTo points the fleet's later logins at addr.
func (f *fleet) moveTo(addr string) { f.addr.Store(&addr) }

func (f *fleet) close() {
	select {
	case <-f.stop:
	default:
		close(f.stop)
	}
	f.wg.Wait()
}

// snsOf returns the serial numbers of terms.
func snsOf(terms []*rawTerminal) []string {
	out := make([]string, len(terms))
	for i, rt := range terms {
		out[i] = rt.id.SN
	}
	return out
}
