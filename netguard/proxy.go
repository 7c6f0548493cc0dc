package netguard

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"unicode"

	proxyproto "github.com/pires/go-proxyproto"
)

// The PROXY protocol (HAProxy's, v2 binary and v1 text) lets a load
// balancer tell the broker whom it forwards: a header before the client's
// first byte names the client's address. The guard trusts it only from
// Options.TrustedProxies, requires it from them (the protocol forbids
// guessing whether a header is there) and refuses it from anyone else.
// The header is parsed by github.com/pires/go-proxyproto.

// proxyMode says what a connection must start with.
type proxyMode uint8

const (
	proxyOff       proxyMode = iota // the PROXY protocol is off: the guard reads nothing
	proxyRequired                   // from a trusted proxy: a header must come first
	proxyForbidden                  // from any other address: a header is refused
)

// Buffer sizes of the header read. A v1 header (at most 107 bytes) must be
// buffered whole; a v2 header is read on as long as it goes (at most
// proxyproto.MaxV2HeaderSize). An untrusted connection needs only the
// 12-byte v2 signature: whatever begins like a header is refused.
const (
	trustedBuffer   = 256
	untrustedBuffer = 16
)

func (g *Guard) proxyMode(a net.Addr) proxyMode {
	if len(g.opts.TrustedProxies) == 0 {
		return proxyOff
	}
	if ip, ok := addrIP(a); ok {
		for _, p := range g.opts.TrustedProxies {
			if p.Contains(ip) {
				return proxyRequired
			}
		}
	}
	return proxyForbidden
}

// addrIP returns the IP address of a, IPv4 as IPv4 (not 4-in-6).
func addrIP(a net.Addr) (netip.Addr, bool) {
	if tcp, ok := a.(*net.TCPAddr); ok {
		ip, ok := netip.AddrFromSlice(tcp.IP)
		return ip.Unmap(), ok
	}
	ap, err := netip.ParseAddrPort(a.String())
	return ap.Addr().Unmap(), err == nil
}

// handshake reads the connection's PROXY header, once, if the guard's
// mode asks for one, and closes the connection if it is refused. It runs
// in whichever goroutine first reads, writes or asks for an address: the
// connection's own, never Accept's. The CONNECT deadline set at Accept
// bounds it.
func (c *conn) handshake() error {
	if c.proxy == proxyOff {
		return nil
	}
	c.hsOnce.Do(func() {
		if c.hsErr = c.readProxyHeader(); c.hsErr != nil {
			c.Close()
		}
		c.l.untrack(c)
	})
	return c.hsErr
}

func (c *conn) readProxyHeader() error {
	peer := hostOf(c.Conn.RemoteAddr())
	size := untrustedBuffer
	if c.proxy == proxyRequired {
		size = trustedBuffer
	}
	br := bufio.NewReaderSize(c.Conn, size)
	h, err := proxyproto.Read(br)
	if errors.Is(err, net.ErrClosed) {
		return err // closed on our side (the listener's Close, a shutdown): no refusal
	}

	if c.proxy == proxyForbidden {
		var ne net.Error
		switch {
		case errors.Is(err, proxyproto.ErrNoProxyProtocol):
			c.keep(br)
			return nil
		case err != nil && errors.As(err, &ne):
			return err // closed, reset or timed out before saying anything
		default: // a header, or bytes that begin like one
			return c.g.refuse(peer, ReasonProxyUntrusted, err)
		}
	}
	if err != nil {
		return c.g.refuse(peer, ReasonProxyInvalid, err)
	}
	client, remote := peer, net.Addr(nil) // LOCAL: the proxy's own connection (a health check)
	if !h.Command.IsLocal() {
		src, _, ok := h.TCPAddrs()
		if !ok {
			return c.g.refuse(peer, ReasonProxyInvalid, fmt.Errorf("header names a %v source, not TCP", h.TransportProtocol))
		}
		client, remote = src.IP.String(), src
	}

	c.remote = remote // also for a refusal below: logs name the client
	c.slotMu.Lock()
	defer c.slotMu.Unlock()
	if c.released {
		return net.ErrClosed // closed while the header was read
	}
	if reason := c.g.assign(client); reason != "" {
		return c.g.refuse(client, reason, nil)
	}
	c.ip = client
	if remote != nil {
		c.g.proxied.Add(1)
	} else {
		c.g.proxyLocal.Add(1)
	}
	c.keep(br)
	return nil
}

// keep makes Read return the bytes br holds past the header first.
func (c *conn) keep(br *bufio.Reader) {
	if br.Buffered() > 0 {
		c.br = br
	}
}

// refuse counts and reports a refusal after Accept and returns the error
// that the connection's Read and Write return from then on.
func (g *Guard) refuse(addr, reason string, cause error) error {
	g.refused(addr, reason)
	if cause != nil {
		return fmt.Errorf("%w: %s from %s: %w", ErrRefused, reason, addr, cause)
	}
	return fmt.Errorf("%w: %s from %s", ErrRefused, reason, addr)
}

// ParsePrefixes parses a list of networks separated by commas or white
// space, each a CIDR prefix (10.0.0.0/8, 2001:db8::/32) or a single address
// (a /32 or /128), for Options.TrustedProxies. Host bits are cleared;
// IPv4-mapped IPv6 forms are taken as IPv4. "" is an empty list.
func ParsePrefixes(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || unicode.IsSpace(r) }) {
		p, err := parsePrefix(f)
		if err != nil {
			return nil, fmt.Errorf("%q: want a network such as 10.0.0.0/8 or an address such as 10.0.0.5", f)
		}
		out = append(out, p)
	}
	return out, nil
}

func parsePrefix(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return netip.Prefix{}, err
		}
		if a.Zone() != "" {
			return netip.Prefix{}, errors.New("zone")
		}
		a = a.Unmap()
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	if a := p.Addr(); a.Is4In6() {
		if p.Bits() < 96 {
			return netip.Prefix{}, errors.New("4-in-6 prefix shorter than /96")
		}
		p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p.Masked(), nil
}
