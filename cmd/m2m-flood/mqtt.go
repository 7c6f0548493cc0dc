package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"golang.org/x/sys/unix"

	"github.com/m2mguard/m2mguard/internal/rawmqtt"
)

// maxInbound bounds the packets the suite reads from the broker.
const maxInbound = 1 << 20

// newDialer returns a dialer from the address local ("" = the kernel's
// choice). The local port is chosen at connect, not at bind
// (IP_BIND_ADDRESS_NO_PORT), so that floods from one address are not
// limited to the ports no other connection of that address uses.
func newDialer(local string, timeout time.Duration) *net.Dialer {
	d := &net.Dialer{Timeout: timeout}
	if local != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(local)}
		d.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
			}); err != nil {
				return err
			}
			return serr
		}
	}
	return d
}

// mqttConn is a raw MQTT 5 connection whose packets are encoded and decoded
// by mochi's packets package: the suite sends exactly what an attacker
// sends, and reads every reason code.
type mqttConn struct {
	conn net.Conn
	r    *bufio.Reader
	buf  bytes.Buffer
}

func dialMQTT(ctx context.Context, d *net.Dialer, addr string) (*mqttConn, error) {
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return &mqttConn{conn: conn, r: bufio.NewReader(conn)}, nil
}

// connectPacket is an MQTT 5 CONNECT with a clean start.
func connectPacket(clientID, username string, password []byte, keepalive uint16) packets.Packet {
	return packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 5,
		Connect: packets.ConnectParams{
			ProtocolName: []byte("MQTT"), Clean: true, Keepalive: keepalive,
			ClientIdentifier: clientID,
			UsernameFlag:     username != "", Username: []byte(username),
			PasswordFlag: password != nil, Password: password,
		},
	}
}

func publishPacket(topic string, payload []byte, qos byte, id uint16) packets.Packet {
	if qos == 0 {
		id = 0
	}
	return packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos}, ProtocolVersion: 5,
		PacketID: id, TopicName: topic, Payload: payload,
	}
}

func subscribePacket(filter string, id uint16) packets.Packet {
	return packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, ProtocolVersion: 5,
		PacketID: id, Filters: packets.Subscriptions{{Filter: filter}},
	}
}

// write sends pk, giving up after timeout.
func (c *mqttConn) write(pk packets.Packet, timeout time.Duration) error {
	c.buf.Reset()
	if err := rawmqtt.Encode(&c.buf, &pk); err != nil {
		return err
	}
	return c.writeRaw(c.buf.Bytes(), timeout)
}

// writeRaw sends encoded packets, giving up after timeout.
func (c *mqttConn) writeRaw(data []byte, timeout time.Duration) error {
	c.conn.SetWriteDeadline(time.Now().Add(timeout))
	_, err := c.conn.Write(data)
	return err
}

// read returns the next packet from the broker within timeout (0 = no
// deadline). Packets other than CONNACK, SUBACK, PUBACK, PUBLISH and
// DISCONNECT are returned with their fixed header only.
func (c *mqttConn) read(timeout time.Duration) (packets.Packet, error) {
	if timeout > 0 {
		c.conn.SetReadDeadline(time.Now().Add(timeout))
	} else {
		c.conn.SetReadDeadline(time.Time{})
	}
	return rawmqtt.Read(c.r, 5, maxInbound)
}

// errNoConnack: the broker answered the CONNECT with another packet.
var errNoConnack = errors.New("first packet is not a CONNACK")

// connect sends pk (a CONNECT) and returns the CONNACK's reason code.
func (c *mqttConn) connect(pk packets.Packet, timeout time.Duration) (byte, error) {
	if err := c.write(pk, timeout); err != nil {
		return 0, err
	}
	ack, err := c.read(timeout)
	if err != nil {
		return 0, err
	}
	if ack.FixedHeader.Type != packets.Connack {
		return 0, errNoConnack
	}
	return ack.ReasonCode, nil
}

// disconnect sends DISCONNECT (normal) and closes the connection.
func (c *mqttConn) disconnect() {
	c.write(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}, ProtocolVersion: 5}, time.Second)
	c.conn.Close()
}

// abort resets the connection (SO_LINGER 0): no FIN, no TIME_WAIT on this
// side, and the broker's next write to it fails.
func (c *mqttConn) abort() {
	if tc, ok := c.conn.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.conn.Close()
}

// peerClosed reports whether the broker has closed the connection (FIN or
// reset), by the socket's state in the kernel: without reading, so unread
// data does not hide it and nothing the broker is stuck writing gets
// through.
func (c *mqttConn) peerClosed() (bool, error) {
	tc, ok := c.conn.(*net.TCPConn)
	if !ok {
		return false, errors.New("not a TCP connection")
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return false, err
	}
	var info *unix.TCPInfo
	var ierr error
	if err := raw.Control(func(fd uintptr) {
		info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	}); err != nil {
		return false, err
	}
	if ierr != nil {
		return false, ierr
	}
	return info.State != unix.BPF_TCP_ESTABLISHED, nil
}

// outcomeOf names the result of a login attempt: the CONNACK code in hex,
// or what happened instead.
func outcomeOf(code byte, err error) string {
	switch {
	case err == nil:
		return fmt.Sprintf("0x%02x", code)
	case errors.Is(err, os.ErrDeadlineExceeded):
		return "timeout"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return "closed"
	case errors.Is(err, errNoConnack):
		return "other-packet"
	}
	return "error"
}

// codeNames are the CONNACK reason codes the broker answers with.
var codeNames = map[string]string{
	"0x00": "accepted", "0x80": "unspecified error", "0x85": "client id not valid",
	"0x86": "bad user name or password", "0x87": "not authorized", "0x88": "server unavailable",
	"0x89": "server busy", "0x8a": "banned", "0x9f": "connection rate exceeded",
	"closed":  "closed without CONNACK",
	"timeout": "no CONNACK before the timeout",
	"error":   "other error", "other-packet": "answered with another packet",
	"dial": "could not connect",
}

// refusal reports whether an outcome is a refused login: a CONNACK with a
// failure code, or a connection closed without one.
func refusal(outcome string) bool {
	return outcome == "closed" || (len(outcome) == 4 && outcome[:2] == "0x" && outcome >= "0x80")
}
