package lastseen

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// An entry in the file is, after its key (the serial number):
//
//	version  1 byte, 1
//	at       8 bytes, unix nanoseconds, big endian
//	protocol 1 byte
//	flags    1 byte: bit 0 = session key; the others 0
//	remote   1 byte of length n, then n bytes
//
// Nothing else: the value is checked whole before anything is used.

const (
	encVersion = 1
	maxRemote  = 255
	headerLen  = 1 + 8 + 1 + 1 + 1
	maxEncoded = headerLen + maxRemote
	flagKey    = 1
)

// errMalformed: a stored value is not an entry.
var errMalformed = errors.New("lastseen: malformed entry")

// encode appends the stored form of e to buf. A remote address longer
// than 255 bytes (none is) is cut.
func encode(buf []byte, e Entry) []byte {
	remote := e.Remote
	if len(remote) > maxRemote {
		remote = remote[:maxRemote]
	}
	var flags byte
	if e.SessionKey {
		flags |= flagKey
	}
	buf = append(buf, encVersion)
	buf = binary.BigEndian.AppendUint64(buf, uint64(e.At.UnixNano()))
	buf = append(buf, e.Protocol, flags, byte(len(remote)))
	return append(buf, remote...)
}

// decode parses a stored value, bounded and exact: anything but the one
// canonical form is an error.
func decode(v []byte) (Entry, error) {
	if len(v) < headerLen || len(v) > maxEncoded {
		return Entry{}, fmt.Errorf("%w: %d bytes", errMalformed, len(v))
	}
	if v[0] != encVersion {
		return Entry{}, fmt.Errorf("%w: version %d", errMalformed, v[0])
	}
	ns := int64(binary.BigEndian.Uint64(v[1:9]))
	proto, flags, n := v[9], v[10], int(v[11])
	if flags&^flagKey != 0 {
		return Entry{}, fmt.Errorf("%w: unknown flags", errMalformed)
	}
	if len(v) != headerLen+n {
		return Entry{}, fmt.Errorf("%w: remote length", errMalformed)
	}
	return Entry{At: time.Unix(0, ns).UTC(), Protocol: proto, SessionKey: flags&flagKey != 0, Remote: string(v[headerLen:])}, nil
}
