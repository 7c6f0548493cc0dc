// Package rawmqtt reads and writes single MQTT packets on a raw
// connection, with mochi's packet codec: for tests and tools that must
// speak MQTT below a client library (attacks, thousands of light
// terminals, exact packet sequences).
package rawmqtt

import (
	"bufio"
	"bytes"
	"fmt"
	"io"

	"github.com/mochi-mqtt/server/v2/packets"
)

// Read reads the next packet of protocol version (4 or 5) from r. A
// packet of more than max bytes is refused unread (0: no bound). CONNACK,
// SUBACK, PUBACK, PUBLISH and DISCONNECT are decoded; other packets come
// with their fixed header only.
func Read(r *bufio.Reader, version byte, max int) (packets.Packet, error) {
	b, err := r.ReadByte()
	if err != nil {
		return packets.Packet{}, err
	}
	var fh packets.FixedHeader
	if err := fh.Decode(b); err != nil {
		return packets.Packet{}, err
	}
	n, _, err := packets.DecodeLength(r)
	if err != nil {
		return packets.Packet{}, err
	}
	if max > 0 && n > max {
		return packets.Packet{}, fmt.Errorf("rawmqtt: packet of %d bytes, at most %d", n, max)
	}
	fh.Remaining = n
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return packets.Packet{}, err
	}
	pk := packets.Packet{FixedHeader: fh, ProtocolVersion: version}
	switch fh.Type {
	case packets.Connack:
		err = pk.ConnackDecode(body)
	case packets.Suback:
		err = pk.SubackDecode(body)
	case packets.Puback:
		err = pk.PubackDecode(body)
	case packets.Publish:
		err = pk.PublishDecode(body)
	case packets.Disconnect:
		err = pk.DisconnectDecode(body)
	}
	return pk, err
}

// Encode appends pk, a packet a client sends (CONNECT, PUBLISH, PUBACK,
// SUBSCRIBE or DISCONNECT), to buf.
func Encode(buf *bytes.Buffer, pk *packets.Packet) error {
	switch pk.FixedHeader.Type {
	case packets.Connect:
		return pk.ConnectEncode(buf)
	case packets.Publish:
		return pk.PublishEncode(buf)
	case packets.Puback:
		return pk.PubackEncode(buf)
	case packets.Subscribe:
		return pk.SubscribeEncode(buf)
	case packets.Disconnect:
		return pk.DisconnectEncode(buf)
	}
	return fmt.Errorf("rawmqtt: encode: packet type %d not supported", pk.FixedHeader.Type)
}
