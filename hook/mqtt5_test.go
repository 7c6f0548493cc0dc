package hook_test

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/internal/rawmqtt"
)

// v5Client is a minimal MQTT 5 client built on mochi's packet codec, for
// the CONNACK, SUBACK and PUBACK reason codes that the 3.1.1-only paho
// client cannot show.
type v5Client struct {
	t    testing.TB
	conn net.Conn
	r    *bufio.Reader
	id   uint16
	held []packets.Packet // packets read while waiting for an ack
}

// dialV5 connects and returns the client and the CONNACK reason code.
func dialV5(t testing.TB, addr, clientID, username string, password []byte, clean bool) (*v5Client, byte) {
	t.Helper()
	return dialV5Via(t, net.Dialer{Timeout: 5 * time.Second}, addr, clientID, username, password, clean)
}

// will, when set, is sent in the next dialV5 CONNECT.
type will struct {
	topic   string
	payload []byte
}

func dialV5Via(t testing.TB, d net.Dialer, addr, clientID, username string, password []byte, clean bool, w ...will) (*v5Client, byte) {
	t.Helper()
	c, code, err := tryDialV5(t, d, addr, clientID, username, password, clean, w...)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	return c, code
}

// tryDialV5 is dialV5Via that returns an error, instead of failing the
// test, when the broker drops the connection without a CONNACK.
func tryDialV5(t testing.TB, d net.Dialer, addr, clientID, username string, password []byte, clean bool, w ...will) (*v5Client, byte, error) {
	t.Helper()
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	c := &v5Client{t: t, conn: conn, r: bufio.NewReader(conn)}
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 5,
		Connect: packets.ConnectParams{
			ProtocolName: []byte("MQTT"), Clean: clean, Keepalive: 30, ClientIdentifier: clientID,
			UsernameFlag: username != "", Username: []byte(username),
			PasswordFlag: password != nil, Password: password,
		},
	}
	if len(w) > 0 {
		pk.Connect.WillFlag, pk.Connect.WillTopic, pk.Connect.WillPayload = true, w[0].topic, w[0].payload
	}
	if !clean {
		pk.Properties.SessionExpiryInterval = 3600
		pk.Properties.SessionExpiryIntervalFlag = true
	}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		return c, 0, err
	}
	conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write(buf.Bytes()); err != nil {
		return c, 0, err
	}
	ack, err := c.tryRead(5 * time.Second)
	if err != nil {
		return c, 0, err
	}
	if ack.FixedHeader.Type != packets.Connack {
		return c, 0, fmt.Errorf("got packet type %d, want CONNACK", ack.FixedHeader.Type)
	}
	return c, ack.ReasonCode, nil
}

func (c *v5Client) write(pk *packets.Packet, enc func(*packets.Packet, *bytes.Buffer) error) {
	c.t.Helper()
	var buf bytes.Buffer
	if err := enc(pk, &buf); err != nil {
		c.t.Fatalf("encode: %v", err)
	}
	c.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.conn.Write(buf.Bytes()); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// read returns the next packet, failing the test after 5 s.
func (c *v5Client) read() packets.Packet {
	c.t.Helper()
	pk, err := c.tryRead(5 * time.Second)
	if err != nil {
		c.t.Fatalf("read: %v", err)
	}
	return pk
}

// tryRead returns the next packet or an error (io.EOF when the server
// closed the connection, a timeout error when nothing came).
func (c *v5Client) tryRead(wait time.Duration) (packets.Packet, error) {
	c.conn.SetReadDeadline(time.Now().Add(wait))
	return rawmqtt.Read(c.r, 5, 0)
}

// subscribe returns the SUBACK reason code of one filter.
func (c *v5Client) subscribe(filter string, qos byte) byte {
	c.t.Helper()
	c.id++
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, ProtocolVersion: 5, PacketID: c.id,
		Filters: packets.Subscriptions{{Filter: filter, Qos: qos}},
	}
	c.write(&pk, (*packets.Packet).SubscribeEncode)
	for {
		ack := c.read()
		if ack.FixedHeader.Type != packets.Suback {
			c.held = append(c.held, ack)
			continue
		}
		{
			if len(ack.ReasonCodes) != 1 {
				c.t.Fatalf("suback with %d codes", len(ack.ReasonCodes))
			}
			return ack.ReasonCodes[0]
		}
	}
}

// publish sends a message; for QoS 1 it returns the PUBACK reason code.
func (c *v5Client) publish(topic string, payload []byte, qos byte) byte {
	c.t.Helper()
	c.id++
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos}, ProtocolVersion: 5, PacketID: c.id,
		TopicName: topic, Payload: payload,
	}
	if qos == 0 {
		pk.PacketID = 0
	}
	c.write(&pk, (*packets.Packet).PublishEncode)
	if qos == 0 {
		return 0
	}
	for {
		ack := c.read()
		if ack.FixedHeader.Type == packets.Puback {
			return ack.ReasonCode
		}
		c.held = append(c.held, ack)
	}
}

// nextPublish returns the next PUBLISH within wait, skipping other packets.
func (c *v5Client) nextPublish(wait time.Duration) (packets.Packet, error) {
	deadline := time.Now().Add(wait)
	for {
		var pk packets.Packet
		var err error
		if len(c.held) > 0 {
			pk, c.held = c.held[0], c.held[1:]
		} else {
			pk, err = c.tryRead(time.Until(deadline))
		}
		if err != nil {
			return pk, err
		}
		if pk.FixedHeader.Type == packets.Publish {
			return pk, nil
		}
		if pk.FixedHeader.Type == packets.Disconnect {
			return pk, fmt.Errorf("disconnected: reason 0x%02x", pk.ReasonCode)
		}
	}
}

// dialV5From connects from another local address.
func dialV5From(t *testing.T, local, addr, clientID, username string, password []byte) (*v5Client, byte) {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}}
	return dialV5Via(t, d, addr, clientID, username, password, true)
}

// retained publishes a retained QoS 1 message.
func retained(t *testing.T, c *v5Client, topic string, payload []byte) {
	t.Helper()
	c.id++
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: true}, ProtocolVersion: 5,
		PacketID: c.id, TopicName: topic, Payload: payload,
	}
	c.write(&pk, (*packets.Packet).PublishEncode)
	for {
		if ack := c.read(); ack.FixedHeader.Type == packets.Puback {
			if ack.ReasonCode >= 0x80 {
				t.Fatalf("retained publish: 0x%02x", ack.ReasonCode)
			}
			return
		}
	}
}
