package broker

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"syscall"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/m2mguard/m2mguard/netguard"
)

// mochiLogHandler is the handler of mochi's log. It drops the attributes
// in which mochi logs whole packets (a repeated CONNECT would carry a
// password token, a PUBLISH its payload), and it names and grades the
// warning mochi's listeners log, with an empty message, whenever a
// connection ends with an error:
//
//   - a refused login (the hook's OnConnect or OnConnectAuthenticate said
//     no): the hook logs it with its reason as login_refused, so mochi's
//     line is a debug line, "mqtt login refused";
//   - a connection closed by either side (EOF, a reset, a closed socket at
//     shutdown or after a kick, a deadline: no CONNECT in time, keep-alive),
//     or by netguard after its PROXY header (netguard logged why): routine,
//     a debug line, "mqtt connection closed";
//   - anything else (a protocol violation, a TLS failure, ...) stays a
//     warning, "mqtt connection ended with an error".
//
// mochi's "attached listener" is a debug line: the broker logs each
// listener itself ("mqtt listener", with its bound address). Every other
// line of mochi passes unchanged.
type mochiLogHandler struct{ slog.Handler }

func (h mochiLogHandler) Handle(ctx context.Context, r slog.Record) error {
	level, msg := r.Level, r.Message
	if msg == "attached listener" {
		level = slog.LevelDebug
		if !h.Handler.Enabled(ctx, level) {
			return nil
		}
	}
	if level == slog.LevelWarn && msg == "" {
		level, msg = gradeConnEnd(r)
		if !h.Handler.Enabled(ctx, level) {
			return nil
		}
	}
	n := slog.NewRecord(r.Time, level, msg, r.PC)
	r.Attrs(func(a slog.Attr) bool {
		switch a.Key {
		case "pk", "packet", "pkv":
			n.AddAttrs(slog.String(a.Key, "[redacted]"))
		default:
			n.AddAttrs(a)
		}
		return true
	})
	return h.Handler.Handle(ctx, n)
}

// gradeConnEnd returns the level and message of mochi's report of a
// connection that ended with the record's "error" attribute.
func gradeConnEnd(r slog.Record) (slog.Level, string) {
	var err error
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "error" {
			err, _ = a.Value.Any().(error)
			return false
		}
		return true
	})
	var code packets.Code
	switch {
	case err == nil:
	case errors.As(err, &code) && refusal(code):
		return slog.LevelDebug, "mqtt login refused"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed),
		errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE),
		errors.Is(err, netguard.ErrRefused),
		errors.As(err, &code) && code.Code == packets.ErrServerShuttingDown.Code:
		return slog.LevelDebug, "mqtt connection closed"
	}
	return slog.LevelWarn, "mqtt connection ended with an error"
}

// refusal reports whether code is a CONNACK refusal: the hook's answers
// (bad credentials, not authorized, banned, server unavailable) and
// mochi's own (busy, quota).
func refusal(code packets.Code) bool {
	switch code.Code {
	case packets.ErrBadUsernameOrPassword.Code, packets.ErrNotAuthorized.Code, packets.ErrBanned.Code,
		packets.ErrServerUnavailable.Code, packets.ErrServerBusy.Code, packets.ErrQuotaExceeded.Code:
		return true
	}
	return false
}

func (h mochiLogHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return mochiLogHandler{h.Handler.WithAttrs(as)}
}

func (h mochiLogHandler) WithGroup(name string) slog.Handler {
	return mochiLogHandler{h.Handler.WithGroup(name)}
}
