package main

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/m2mguard/m2mguard/adminapi"
)

// parseDate reads --before and --since: a date (2006-01-02, midnight UTC)
// or an RFC 3339 time.
func parseDate(flag, v string) (time.Time, error) {
	if d, err := time.Parse(time.DateOnly, v); err == nil {
		return d, nil
	}
	if t, err := time.Parse(time.RFC3339, v); err == nil {
		return t, nil
	}
	return time.Time{}, usagef("--%s: want a date (2006-01-02, UTC) or an RFC 3339 time, got %q", flag, v)
}

func reportCmd(o *options) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "report",
		Short: "Reports of the fleet: expiring credentials, terminals never or not lately seen (-o table, csv or json)",
		Long: `Reports of the whole registry, streamed: the broker reads it a page at a time, so
they work on fleets of any size. Output: a table (-o table), CSV (-o csv) or a JSON
array (-o json), one row per terminal: sn, status, the expiries of up, down and bk,
and the last login (when, from where, MQTT version, session key). Progress goes to
stderr while stderr is a terminal (--progress). Dates are 2006-01-02 (midnight UTC)
or RFC 3339 times. Last logins are written by the broker every few seconds: a crash
of the broker loses the last few.`,
	}
	var before, since, progress string
	run := func(kind string) func(cmd *cobra.Command, args []string) error {
		return func(cmd *cobra.Command, args []string) error {
			q := adminapi.ReportQuery{Kind: kind}
			var err error
			switch kind {
			case adminapi.ReportExpiring:
				if before == "" {
					return usagef("--before is required")
				}
				if q.Before, err = parseDate("before", before); err != nil {
					return err
				}
			case adminapi.ReportNotSeen:
				if since == "" {
					return usagef("--since is required")
				}
				if q.Since, err = parseDate("since", since); err != nil {
					return err
				}
			}
			switch progress {
			case "auto", "always", "never":
			default:
				return usagef("--progress: want auto, always or never")
			}
			c, err := o.clientWithTimeout(0) // a report of a large fleet takes long; a cancel still ends it
			if err != nil {
				return err
			}
			out := newReportWriter(cmd.OutOrStdout(), o.output, kind)
			show := progress == "always" || (progress == "auto" && o.stderrTTY)
			errw := cmd.ErrOrStderr()
			done, err := c.Report(cmd.Context(), q, out.row, func(p adminapi.ReportProgress) {
				out.flush()
				if show {
					fmt.Fprintf(errw, "\rscanned %d terminals, %d in the report", p.Scanned, p.Matched)
				}
			})
			if show {
				fmt.Fprintln(errw)
			}
			if ferr := out.close(err == nil); err == nil {
				err = ferr
			}
			if err != nil {
				return err
			}
			if o.output == "table" {
				fmt.Fprintf(errw, "%d of %d terminals\n", done.Matched, done.Scanned)
			}
			return nil
		}
	}
	expiring := &cobra.Command{
		Use:   "expiring --before DATE",
		Short: "Terminals with a password or basic key that expires before DATE (or has expired)",
		Args:  cobra.NoArgs,
		RunE:  run(adminapi.ReportExpiring),
	}
	expiring.Flags().StringVar(&before, "before", "", "expiries before this date (2006-01-02) or time (RFC 3339) (required)")
	never := &cobra.Command{
		Use:   "never-seen",
		Short: "Terminals that never logged in",
		Args:  cobra.NoArgs,
		RunE:  run(adminapi.ReportNeverSeen),
	}
	notSeen := &cobra.Command{
		Use:   "not-seen --since DATE",
		Short: "Terminals whose last login was before DATE, those never seen included",
		Args:  cobra.NoArgs,
		RunE:  run(adminapi.ReportNotSeen),
	}
	notSeen.Flags().StringVar(&since, "since", "", "last login before this date (2006-01-02) or time (RFC 3339) (required)")
	for _, c := range []*cobra.Command{expiring, never, notSeen} {
		c.Flags().StringVar(&progress, "progress", "auto", "progress on stderr: auto (when stderr is a terminal), always or never")
		c.Annotations = map[string]string{csvAllowed: "yes"}
	}
	cmd.AddCommand(expiring, never, notSeen)
	return cmd
}

// csvAllowed marks the commands that take -o csv.
const csvAllowed = "csv"

// reportWriter writes report rows as they arrive: a table, CSV, or a JSON
// array, without holding the report.
type reportWriter struct {
	w      io.Writer
	format string
	kind   string
	csv    *csv.Writer
	tw     *tabwriter.Writer
	rows   int
}

var reportColumns = []string{"sn", "status", "upexp", "downexp", "bkexp", "expiring", "last_seen", "remote", "protocol", "session_key"}

func newReportWriter(w io.Writer, format, kind string) *reportWriter {
	r := &reportWriter{w: w, format: format, kind: kind}
	switch format {
	case "csv":
		r.csv = csv.NewWriter(w)
		r.csv.Write(reportColumns)
	case "json":
		io.WriteString(w, "[")
	default:
		r.tw = table(w)
		fmt.Fprintln(r.tw, "SN\tSTATUS\tUPEXP\tDOWNEXP\tBKEXP\tEXPIRING\tLAST SEEN\tFROM\tMQTT\tSESSION KEY")
	}
	return r
}

func (r *reportWriter) row(row adminapi.ReportRow) error {
	r.rows++
	seen, remote, proto, key := "", "", "", ""
	if ls := row.LastSeen; ls != nil {
		seen, remote, proto, key = ls.At.UTC().Format(time.RFC3339), ls.Remote, mqttVersion(ls.Protocol), strconv.FormatBool(ls.SessionKey)
	}
	switch r.format {
	case "csv":
		return r.csv.Write([]string{row.SN, row.Status, expiry(row.UpExp), expiry(row.DownExp), expiry(row.BKExp),
			strings.Join(row.Expiring, " "), seen, remote, proto, key})
	case "json":
		sep := ",\n  "
		if r.rows == 1 {
			sep = "\n  "
		}
		data, err := jsonLine(row)
		if err != nil {
			return err
		}
		_, err = io.WriteString(r.w, sep+data)
		return err
	default:
		if seen == "" {
			seen = "never"
		}
		_, err := fmt.Fprintf(r.tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", row.SN, row.Status, expiry(row.UpExp), expiry(row.DownExp),
			expiry(row.BKExp), dash(strings.Join(row.Expiring, ",")), seen, dash(remote), dash(proto), dash(key))
		return err
	}
}

// flush writes what is buffered (after each page the broker reported).
func (r *reportWriter) flush() {
	switch {
	case r.csv != nil:
		r.csv.Flush()
	case r.tw != nil:
		r.tw.Flush()
	}
}

// close ends the output; a JSON array is closed only for a whole report
// (ok), so that a cut one does not parse.
func (r *reportWriter) close(ok bool) error {
	r.flush()
	switch {
	case r.csv != nil:
		return r.csv.Error()
	case r.format == "json" && ok:
		if r.rows > 0 {
			io.WriteString(r.w, "\n")
		}
		_, err := io.WriteString(r.w, "]\n")
		return err
	}
	return nil
}

// jsonLine is v as one line of JSON.
func jsonLine(v any) (string, error) {
	data, err := json.Marshal(v)
	return string(data), err
}

func mqttVersion(p byte) string {
	if p == 5 {
		return "5"
	}
	return "3.1.1"
}

func whoamiCmd(o *options) *cobra.Command {
	return &cobra.Command{
		Use:   "whoami",
		Short: "Show the operator the token belongs to and its role (full or read)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			op, err := c.WhoAmI(cmd.Context())
			if err != nil {
				return err
			}
			if o.output == "json" {
				return printJSON(cmd.OutOrStdout(), op)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "operator %s (role %s), token of %s\n", op.Name, op.Role, o.tokenSource)
			return nil
		},
	}
}

func tokenCmd(o *options) *cobra.Command {
	cmd := &cobra.Command{Use: "token", Short: "Make tokens of named operators (admin.tokens_file)"}
	var name, role string
	gen := &cobra.Command{
		Use:   "new --name NAME [--role full|read]",
		Short: "Generate an operator's token and print it (once) with its line for admin.tokens_file",
		Long: `Generate a random token (256 bits) for an operator and print it, once, with the line
to append to the broker's admin.tokens_file: the operator's name, role and the
SHA-256 of the token. The broker stores only the hash; give the token to the
operator (m2mctl --token-file), and restart the broker to load the file.
A read-only operator (--role read) may list and read; every change is refused (403).
The audit log and the security events name the operator of every change.

This command does not talk to the broker.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := validOperatorName(name); err != nil {
				return err
			}
			if role != adminapi.RoleFull && role != adminapi.RoleRead {
				return usagef("--role: want full or read")
			}
			raw := make([]byte, 32)
			if _, err := rand.Read(raw); err != nil {
				return err
			}
			tok := base64.RawURLEncoding.EncodeToString(raw)
			line := adminapi.OperatorLine(name, role, tok)
			w := cmd.OutOrStdout()
			if o.output == "json" {
				return printJSON(w, map[string]string{"name": name, "role": role, "token": tok, "line": line})
			}
			fmt.Fprintf(w, "token of %s (shown once; give it to the operator, it is stored nowhere):\n  %s\n", name, tok)
			fmt.Fprintf(w, "line for admin.tokens_file (then restart the broker):\n  %s\n", line)
			return nil
		},
	}
	gen.Flags().StringVar(&name, "name", "", "the operator's name in audit logs: 1-64 of [A-Za-z0-9._-] (required)")
	gen.Flags().StringVar(&role, "role", adminapi.RoleFull, "full (read and change) or read (read only)")
	cmd.AddCommand(gen)
	return cmd
}

func validOperatorName(name string) error {
	ok := len(name) >= 1 && len(name) <= 64 && name != "admin"
	for i := 0; ok && i < len(name); i++ {
		c := name[i]
		ok = '0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || c == '.' || c == '_' || c == '-'
	}
	if !ok {
		return usagef("--name: want 1 to 64 of [A-Za-z0-9._-], not admin (the admin token's)")
	}
	return nil
}
