// Package wslistener is an MQTT-over-WebSocket listener for mochi-mqtt on a
// net.Listener that the caller binds (and may guard with netguard).
//
// mochi's own listeners.Websocket binds its address inside Serve, so a taken
// port is no start-up error and port 0 cannot be used, and it accepts
// connections that no wrapper sees. This listener serves HTTP on the
// listener it is given, upgrades any path to a WebSocket (subprotocol
// "mqtt", like mochi's), and bounds what an idle client can hold: the HTTP
// request (and the TLS handshake, for wss) must arrive within
// ConnectTimeout, and after the upgrade the MQTT CONNECT must arrive within
// ConnectTimeout again (gorilla clears the deadlines when it upgrades, and
// mochi sets none before the CONNECT). mochi replaces that deadline with the
// keepalive one once it has read the CONNECT.
//
// Any origin may connect: MQTT credentials travel inside the connection,
// never in cookies, so a foreign page gains nothing a direct client lacks.
package wslistener

import (
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/mochi-mqtt/server/v2/listeners"
)

// DefaultConnectTimeout is the ConnectTimeout of the zero Options.
const DefaultConnectTimeout = 10 * time.Second

// maxHeaderBytes bounds the HTTP upgrade request's header.
const maxHeaderBytes = 16 << 10

// ErrNotBinary is returned by a connection's Read when the client sends a
// text message: MQTT over WebSocket is binary only.
var ErrNotBinary = errors.New("wslistener: message is not binary")

// Options configure a Listener. The zero value is useful: plain ws and
// DefaultConnectTimeout.
type Options struct {
	// TLSConfig, if set, makes the listener wss: it is used for the TLS
	// handshake of every connection (a copy; the caller's is not changed).
	TLSConfig *tls.Config
	// ConnectTimeout bounds the TLS handshake and HTTP upgrade request, and
	// then, from the upgrade, the arrival of the MQTT CONNECT.
	ConnectTimeout time.Duration
}

// Listener is a mochi listeners.Listener serving MQTT over WebSocket on a
// bound net.Listener.
type Listener struct {
	id   string
	ln   net.Listener
	opts Options

	log      *slog.Logger
	srv      *http.Server
	upgrader websocket.Upgrader

	mu        sync.Mutex
	establish listeners.EstablishFn
	closed    bool
	served    chan struct{} // closed when Serve returns; nil before Serve
}

var _ listeners.Listener = (*Listener)(nil)

// New returns a listener with mochi ID id that serves on ln (an already
// bound listener; Close closes it).
func New(id string, ln net.Listener, opts Options) *Listener {
	if opts.ConnectTimeout <= 0 {
		opts.ConnectTimeout = DefaultConnectTimeout
	}
	if opts.TLSConfig != nil {
		opts.TLSConfig = opts.TLSConfig.Clone()
		opts.TLSConfig.NextProtos = []string{"http/1.1"} // a WebSocket upgrade needs HTTP/1.1
		ln = tls.NewListener(ln, opts.TLSConfig)
	}
	return &Listener{id: id, ln: ln, opts: opts}
}

// ID returns the listener's mochi ID.
func (l *Listener) ID() string { return l.id }

// Address returns the bound address.
func (l *Listener) Address() string { return l.ln.Addr().String() }

// Protocol returns "wss" with TLS, else "ws".
func (l *Listener) Protocol() string {
	if l.opts.TLSConfig != nil {
		return "wss"
	}
	return "ws"
}

// Init prepares the HTTP server; mochi calls it when the listener is added.
func (l *Listener) Init(log *slog.Logger) error {
	if log == nil {
		log = slog.Default()
	}
	l.log = log
	l.upgrader = websocket.Upgrader{
		HandshakeTimeout: l.opts.ConnectTimeout,
		Subprotocols:     []string{"mqtt"},
		CheckOrigin:      func(*http.Request) bool { return true },
		WriteBufferPool:  &sync.Pool{}, // idle connections hold no write buffer
	}
	t := l.opts.ConnectTimeout
	l.srv = &http.Server{
		Handler:           http.HandlerFunc(l.handle),
		ReadHeaderTimeout: t, // also bounds the TLS handshake
		ReadTimeout:       t,
		IdleTimeout:       t,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug), // TLS handshake errors of scanners
	}
	return nil
}

// Serve serves until Close and hands every upgraded connection to establish
// (mochi's EstablishConnection). mochi calls it in a goroutine of its own.
func (l *Listener) Serve(establish listeners.EstablishFn) {
	l.mu.Lock()
	if l.closed || l.served != nil {
		l.mu.Unlock()
		return
	}
	l.establish = establish
	l.served = make(chan struct{})
	l.mu.Unlock()
	defer close(l.served)
	if err := l.srv.Serve(l.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		l.log.Error("websocket listener stopped", "listener", l.id, "error", err)
	}
}

// Close stops accepting, closes the connections that have not upgraded yet,
// waits for Serve to return and asks mochi to close the listener's clients
// (closeClients). Only the first call does anything, as with mochi's own
// listeners: mochi's Server.Close closes every listener again, and
// internal/mochifix relies on that second call not calling back (the
// deadlock of mochi-mqtt/server#488). A connection's goroutine, once
// upgraded, runs mochi's client and ends when mochi stops that client.
func (l *Listener) Close(closeClients listeners.CloseFn) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.closed = true
	served := l.served
	l.mu.Unlock()
	if l.srv != nil {
		l.srv.Close()
	}
	l.ln.Close() // if Serve never ran
	if served != nil {
		<-served
	}
	closeClients(l.id)
}

func (l *Listener) handle(w http.ResponseWriter, r *http.Request) {
	ws, err := l.upgrader.Upgrade(w, r, nil)
	if err != nil {
		return // the upgrader has answered with an HTTP error
	}
	c := NewConn(ws)
	defer c.Close()
	if err := c.SetReadDeadline(time.Now().Add(l.opts.ConnectTimeout)); err != nil {
		return
	}
	l.mu.Lock()
	establish, closed := l.establish, l.closed
	l.mu.Unlock()
	if closed {
		return // upgraded while the listener closed: mochi is shutting down
	}
	if err := establish(l.id, c); err != nil {
		l.log.Debug("websocket client ended", "listener", l.id, "remote", c.RemoteAddr().String(), "error", err)
	}
}

// Conn is an upgraded WebSocket connection as the byte stream mochi reads
// and writes: every Write is one binary message, Read returns the bytes of
// the binary messages in order. Deadlines, addresses and Close are those of
// the underlying connection.
type Conn struct {
	net.Conn
	ws *websocket.Conn
	r  io.Reader // the message being read; nil between messages
}

// NewConn returns ws as a Conn.
func NewConn(ws *websocket.Conn) *Conn { return &Conn{Conn: ws.NetConn(), ws: ws} }

// Read reads from the current binary message, moving on to the next one at
// its end. A text message is ErrNotBinary.
func (c *Conn) Read(p []byte) (int, error) {
	for {
		if c.r == nil {
			op, r, err := c.ws.NextReader()
			if err != nil {
				return 0, err
			}
			if op != websocket.BinaryMessage {
				return 0, ErrNotBinary
			}
			c.r = r
		}
		n, err := c.r.Read(p)
		if errors.Is(err, io.EOF) {
			c.r = nil
			if n == 0 && len(p) > 0 {
				continue // an empty message, or the end of one: read on
			}
			err = nil
		}
		return n, err
	}
}

// Write writes p as one binary message.
func (c *Conn) Write(p []byte) (int, error) {
	if err := c.ws.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close closes the underlying connection (without a close frame, as mochi's
// listener does: mochi has sent its DISCONNECT, if any).
func (c *Conn) Close() error { return c.ws.Close() }
