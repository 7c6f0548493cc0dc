package main

import (
	"encoding/csv"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/codec"
)

// errRejected: an import left rows out.
var errRejected = errors.New("rows rejected")

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func table(w io.Writer) *tabwriter.Writer { return tabwriter.NewWriter(w, 2, 4, 2, ' ', 0) }

func expiry(e uint32) string {
	if e == codec.Never {
		return "never"
	}
	return time.Unix(int64(e), 0).UTC().Format(time.RFC3339)
}

func ts(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func terminalCmd(o *options) *cobra.Command {
	cmd := &cobra.Command{Use: "terminal", Short: "Register, inspect, disable, enable, rekey, delete and import terminals"}
	cmd.AddCommand(terminalAddCmd(o), terminalGetCmd(o), terminalListCmd(o),
		terminalStatusCmd(o, "disable", "Disable a terminal: its live sessions end at once, its pending change is cancelled, its logins are refused (CONNACK 0x87 under MQTT 5)"),
		terminalStatusCmd(o, "enable", "Enable a disabled terminal"),
		terminalRekeyCmd(o), terminalDeleteCmd(o), terminalImportCmd(o))
	return cmd
}

func terminalAddCmd(o *options) *cobra.Command {
	var req adminapi.RegisterRequest
	var creds string
	cmd := &cobra.Command{
		Use:   "add --sn SN --imei IMEI --imsi IMSI [--msisdn N] [--alg hs256|md5] [--creds FILE]",
		Short: "Register a terminal and print its provisioning bundle (the one place secrets are printed)",
		Long: `Register a terminal with fresh credentials and print its provisioning bundle:
sn, IMEI, IMSI, alg, the uplink and downlink passwords, the basic key (hex), their
expiries and the broker URL. This is what a factory writes into the device.

This command prints secrets, by design and only here: the broker returns them once,
at registration, and never again. Keep the output safe (or use --creds to write the
terminal's credential file for m2m-terminal and the client library, mode 0600).`,
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, f := range []struct{ name, v string }{{"sn", req.SN}, {"imei", req.IMEI}, {"imsi", req.IMSI}} {
				if f.v == "" {
					return usagef("--%s is required", f.name)
				}
			}
			if creds != "" {
				if _, err := os.Stat(creds); err == nil {
					return usagef("--creds: %s exists; not overwriting another terminal's credentials", creds)
				}
			}
			c, err := o.client()
			if err != nil {
				return err
			}
			b, err := c.Register(cmd.Context(), req)
			if err != nil {
				return err
			}
			if creds != "" {
				if err := writeCreds(creds, b); err != nil {
					return fmt.Errorf("terminal %s is registered, but the credential file failed: %w", b.SN, err)
				}
			}
			return printBundle(cmd.OutOrStdout(), o, b, creds)
		},
	}
	f := cmd.Flags()
	f.StringVar(&req.SN, "sn", "", "serial number: 1-16 of [A-Za-z0-9] (required)")
	f.StringVar(&req.IMEI, "imei", "", "IMEI: 14-16 digits (required)")
	f.StringVar(&req.IMSI, "imsi", "", "IMSI: 6-15 digits (required)")
	f.StringVar(&req.MSISDN, "msisdn", "", "MSISDN for credential changes by SMS (digits)")
	f.StringVar(&req.Alg, "alg", "hs256", "digest algorithm: hs256, or md5 for legacy WMMP firmware")
	f.BoolVar(&req.RequireEncryption, "require-encryption", false, "refuse this terminal's data publishes without a session key")
	f.StringVar(&creds, "creds", "", "also write the terminal's credential file here (m2m-terminal --creds; mode 0600; must not exist)")
	return cmd
}

// printBundle prints a provisioning bundle (the secrets, shown once).
func printBundle(w io.Writer, o *options, b *adminapi.Bundle, creds string) error {
	if o.output == "json" {
		return printJSON(w, b)
	}
	fmt.Fprintf(w, "Provisioning bundle of terminal %s (shown once: write it into the device)\n", b.SN)
	tw := table(w)
	fmt.Fprintf(tw, "sn\t%s\n", b.SN)
	fmt.Fprintf(tw, "imei\t%s\n", b.IMEI)
	fmt.Fprintf(tw, "imsi\t%s\n", b.IMSI)
	if b.MSISDN != "" {
		fmt.Fprintf(tw, "msisdn\t%s\n", b.MSISDN)
	}
	fmt.Fprintf(tw, "alg\t%s\n", b.Alg)
	fmt.Fprintf(tw, "require_encryption\t%t\n", b.RequireEncryption)
	fmt.Fprintf(tw, "up\t%s\n", b.Up)
	fmt.Fprintf(tw, "upexp\t%d (%s)\n", b.UpExp, expiry(b.UpExp))
	fmt.Fprintf(tw, "down\t%s\n", b.Down)
	fmt.Fprintf(tw, "downexp\t%d (%s)\n", b.DownExp, expiry(b.DownExp))
	fmt.Fprintf(tw, "bk\t%s\n", b.BK)
	fmt.Fprintf(tw, "bkexp\t%d (%s)\n", b.BKExp, expiry(b.BKExp))
	fmt.Fprintf(tw, "broker\t%s\n", b.BrokerURL)
	tw.Flush()
	switch {
	case creds != "" && client.ValidateBrokerURL(b.BrokerURL) == nil:
		fmt.Fprintf(w, "credential file %s written (mode 0600, with the broker URL): m2m-terminal connect --creds %s --session-key\n", creds, creds)
	case creds != "":
		fmt.Fprintf(w, "credential file %s written (mode 0600): m2m-terminal connect --broker URL --creds %s --session-key\n", creds, creds)
	}
	return nil
}

func terminalRekeyCmd(o *options) *cobra.Command {
	var creds string
	cmd := &cobra.Command{
		Use:   "rekey SN [--creds FILE]",
		Short: "Replace every credential of a terminal out of band and print the new provisioning bundle",
		Long: `Replace both access passwords and the basic key of a terminal with fresh values,
without sending anything to the terminal, and print the new provisioning bundle
(shown once). A pending change is cancelled and live sessions end; the status is
kept. This is how a terminal whose secrets may have been read out is rotated:

  m2mctl terminal disable SN     # its sessions end, its logins are refused
  m2mctl terminal rekey SN       # write the new values into the genuine device
  m2mctl terminal enable SN

A change over the air (change start) would deliver the new values to whoever holds
the old ones. --creds writes the credential file of m2m-terminal; it may replace a
file of the same terminal, never another terminal's.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			sn, err := snArg(args)
			if err != nil {
				return err
			}
			if creds != "" {
				if data, err := os.ReadFile(creds); err == nil {
					if rec, err := client.DecodeRecord(data); err != nil || rec.Identity.SN != sn {
						return usagef("--creds: %s is not the credential file of terminal %s; not overwriting it", creds, sn)
					}
				}
			}
			c, err := o.client()
			if err != nil {
				return err
			}
			b, err := c.RekeyTerminal(cmd.Context(), sn)
			if err != nil {
				return err
			}
			if creds != "" {
				if err := writeCreds(creds, b); err != nil {
					return fmt.Errorf("terminal %s is rekeyed, but the credential file failed: %w", b.SN, err)
				}
			}
			return printBundle(cmd.OutOrStdout(), o, b, creds)
		},
	}
	cmd.Flags().StringVar(&creds, "creds", "", "also write the terminal's credential file here (mode 0600; a file of another terminal is not overwritten)")
	return cmd
}

// writeCreds writes the bundle as a client.FileStore credential file, with
// the broker URL (which m2m-terminal then dials without --broker).
func writeCreds(path string, b *adminapi.Bundle) error {
	alg, err := codec.ParseAlg(b.Alg)
	if err != nil {
		return err
	}
	bk, err := hex.DecodeString(b.BK)
	if err != nil {
		return err
	}
	rec := &client.Record{
		Identity: codec.Identity{SN: b.SN, IMEI: b.IMEI, IMSI: b.IMSI}, Alg: alg,
		Current: client.Credentials{Up: []byte(b.Up), UpExp: b.UpExp, Down: []byte(b.Down), DownExp: b.DownExp, BK: bk, BKExp: b.BKExp},
	}
	if client.ValidateBrokerURL(b.BrokerURL) == nil { // else m2m-terminal needs --broker
		rec.BrokerURL = b.BrokerURL
	}
	return client.NewFileStore(path).Save(rec)
}

func printTerminal(w io.Writer, t *adminapi.Terminal) {
	tw := table(w)
	fmt.Fprintf(tw, "sn\t%s\n", t.SN)
	fmt.Fprintf(tw, "imei\t%s\n", t.IMEI)
	fmt.Fprintf(tw, "imsi\t%s\n", t.IMSI)
	fmt.Fprintf(tw, "msisdn\t%s\n", dash(t.MSISDN))
	fmt.Fprintf(tw, "alg\t%s\n", t.Alg)
	fmt.Fprintf(tw, "status\t%s\n", t.Status)
	fmt.Fprintf(tw, "require_encryption\t%t\n", t.RequireEncryption)
	fmt.Fprintf(tw, "upexp\t%s\n", expiry(t.UpExp))
	fmt.Fprintf(tw, "downexp\t%s\n", expiry(t.DownExp))
	fmt.Fprintf(tw, "bkexp\t%s\n", expiry(t.BKExp))
	if t.Pending != nil {
		fmt.Fprintf(tw, "pending change\t%s %s (%s, %s, deadline %s, delivered %t)\n", t.Pending.RID, t.Pending.What, t.Pending.Mode, t.Pending.Origin, ts(t.Pending.Deadline), t.Pending.Delivered)
	} else {
		fmt.Fprintf(tw, "pending change\t-\n")
	}
	fmt.Fprintf(tw, "last committed\t%s\n", dash(t.LastCommitted))
	fmt.Fprintf(tw, "last seen\t%s\n", lastSeen(t.LastSeen))
	fmt.Fprintf(tw, "created\t%s\n", ts(t.Created))
	fmt.Fprintf(tw, "updated\t%s\n", ts(t.Updated))
	tw.Flush()
}

// lastSeen describes a terminal's last login: "2025-03-01T12:00:00Z from
// 192.0.2.7:50122, MQTT 3.1.1, session key", or "never".
func lastSeen(ls *adminapi.LastSeen) string {
	if ls == nil {
		return "never"
	}
	key := "no session key"
	if ls.SessionKey {
		key = "session key"
	}
	return fmt.Sprintf("%s from %s, MQTT %s, %s", ts(ls.At), ls.Remote, mqttVersion(ls.Protocol), key)
}

func snArg(args []string) (string, error) {
	if err := codec.ValidateSN(args[0]); err != nil {
		return "", usagef("serial number %q: want 1-16 of [A-Za-z0-9]", args[0])
	}
	return args[0], nil
}

func terminalGetCmd(o *options) *cobra.Command {
	return &cobra.Command{
		Use:   "get SN",
		Short: "Show a terminal's record (no secrets)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			sn, err := snArg(args)
			if err != nil {
				return err
			}
			c, err := o.client()
			if err != nil {
				return err
			}
			t, err := c.GetTerminal(cmd.Context(), sn)
			if err != nil {
				return err
			}
			if o.output == "json" {
				return printJSON(cmd.OutOrStdout(), t)
			}
			printTerminal(cmd.OutOrStdout(), t)
			return nil
		},
	}
}

func terminalListCmd(o *options) *cobra.Command {
	var after string
	var limit int
	var all bool
	cmd := &cobra.Command{
		Use:   "list [--after SN] [--limit N] [--all]",
		Short: "List terminals, sorted by serial number, one page (or --all)",
		RunE: func(cmd *cobra.Command, args []string) error {
			if limit < 1 || limit > 1000 {
				return usagef("--limit: want 1 to 1000")
			}
			c, err := o.client()
			if err != nil {
				return err
			}
			out := &adminapi.TerminalList{Terminals: []adminapi.Terminal{}}
			if all {
				for t, err := range c.AllTerminals(cmd.Context(), limit) {
					if err != nil {
						return err
					}
					out.Terminals = append(out.Terminals, t)
				}
			} else if out, err = c.ListTerminals(cmd.Context(), after, limit); err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if o.output == "json" {
				return printJSON(w, out)
			}
			tw := table(w)
			fmt.Fprintln(tw, "SN\tIMEI\tIMSI\tALG\tSTATUS\tPENDING\tUPDATED\tLAST SEEN")
			for _, t := range out.Terminals {
				pending := "-"
				if t.Pending != nil {
					pending = t.Pending.What + "/" + t.Pending.Mode
				}
				seen := "never"
				if t.LastSeen != nil {
					seen = ts(t.LastSeen.At)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", t.SN, t.IMEI, t.IMSI, t.Alg, t.Status, pending, ts(t.Updated), seen)
			}
			tw.Flush()
			if out.Next != "" {
				fmt.Fprintf(cmd.ErrOrStderr(), "more: m2mctl terminal list --after %s (or --all)\n", out.Next)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&after, "after", "", "start after this serial number")
	f.IntVar(&limit, "limit", 100, "terminals per page (1-1000)")
	f.BoolVar(&all, "all", false, "fetch every page")
	return cmd
}

func terminalStatusCmd(o *options, action, short string) *cobra.Command {
	return &cobra.Command{
		Use:   action + " SN",
		Short: short,
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			sn, err := snArg(args)
			if err != nil {
				return err
			}
			c, err := o.client()
			if err != nil {
				return err
			}
			setStatus := c.DisableTerminal
			if action == "enable" {
				setStatus = c.EnableTerminal
			}
			t, err := setStatus(cmd.Context(), sn)
			if err != nil {
				return err
			}
			if o.output == "json" {
				return printJSON(cmd.OutOrStdout(), t)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "terminal %s is %s\n", t.SN, t.Status)
			return nil
		},
	}
}

func terminalDeleteCmd(o *options) *cobra.Command {
	return &cobra.Command{
		Use:   "delete SN",
		Short: "Delete a terminal (its credentials are gone for good)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			sn, err := snArg(args)
			if err != nil {
				return err
			}
			c, err := o.client()
			if err != nil {
				return err
			}
			if err := c.DeleteTerminal(cmd.Context(), sn); err != nil {
				return err
			}
			if o.output == "json" {
				return printJSON(cmd.OutOrStdout(), map[string]string{"deleted": sn})
			}
			fmt.Fprintf(cmd.OutOrStdout(), "terminal %s deleted\n", sn)
			return nil
		},
	}
}

func terminalImportCmd(o *options) *cobra.Command {
	var progress, credsOut string
	cmd := &cobra.Command{
		Use:   "import FILE.csv|-",
		Short: "Register terminals from CSV, with a progress bar on stderr",
		Long: `Register terminals from a CSV file ('-' reads stdin). The header names the columns,
in any order: sn, imei, imsi (required), and optionally msisdn, alg, up, down
(8-64 printable characters without . ; =) and bk (64 lower-case hex digits). A
missing or empty alg means hs256; missing or empty credentials are generated (and
cannot be shown later: import them from the file if the devices already hold them).
The progress bar counts the rows read, stored or rejected.

Valid rows are stored; each rejected row is reported with its line and reason.
The command exits 1 if any row was rejected.

--creds-out FILE asks the broker for the provisioning bundle of every terminal it
stores (the generated secrets too, the one time they exist outside the store) and
writes them to FILE as CSV, created with mode 0600 (an existing file is refused):
sn, imei, imsi, msisdn, alg, require_encryption, up, upexp, down, downexp, bk (hex),
bkexp, broker_url, one line per terminal, as a factory writes them into devices.
Nothing else shows them: keep FILE safe and delete it once the devices hold them.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			switch progress {
			case "auto", "always", "never":
			default:
				return usagef("--progress: want auto, always or never")
			}
			var out *credsFile
			if credsOut != "" {
				var err error
				if out, err = createCredsFile(credsOut); err != nil {
					return usagef("--creds-out: %v", err)
				}
				defer out.abandon()
			}
			var in io.Reader = o.stdin
			if args[0] != "-" {
				f, err := os.Open(args[0])
				if err != nil {
					return usagef("%v", err)
				}
				defer f.Close()
				in = f
			}
			c, err := o.clientWithTimeout(0) // an import may take long; a cancel still ends it
			if err != nil {
				return err
			}
			bar := &progressBar{w: cmd.ErrOrStderr(), on: progress == "always" || (progress == "auto" && o.stderrTTY)}
			opts := adminapi.ImportOptions{Progress: func(p adminapi.Progress) { bar.update(p.Done, p.Total) }}
			if out != nil {
				opts.Bundle = out.write
			}
			rep, importErr := c.Import(cmd.Context(), in, opts)
			bar.finish()
			if out != nil {
				if err := out.close(cmd.ErrOrStderr(), rep); err != nil && importErr == nil {
					importErr = err
				}
			}
			if rep == nil {
				return importErr
			}
			w := cmd.OutOrStdout()
			if o.output == "json" {
				if err := printJSON(w, rep); err != nil {
					return err
				}
			} else {
				fmt.Fprintf(w, "rows %d, created %d, rejected %d\n", rep.Rows, rep.Created, len(rep.Rejected))
				if len(rep.Rejected) > 0 {
					tw := table(w)
					fmt.Fprintln(tw, "LINE\tSN\tREASON")
					for _, r := range rep.Rejected {
						fmt.Fprintf(tw, "%d\t%s\t%s\n", r.Line, dash(r.SN), r.Reason)
					}
					tw.Flush()
				}
			}
			if importErr != nil { // the import stopped: the report is of the rows stored before
				return importErr
			}
			if len(rep.Rejected) > 0 {
				return fmt.Errorf("%w: %d of %d", errRejected, len(rep.Rejected), rep.Rows)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&progress, "progress", "auto", "progress bar on stderr: auto (when stderr is a terminal), always or never")
	cmd.Flags().StringVar(&credsOut, "creds-out", "", "write the secrets of the terminals stored to this CSV file (created 0600; must not exist)")
	return cmd
}

// credsFile is the CSV file of --creds-out: the provisioning bundles of
// the terminals an import stored, written as they arrive.
type credsFile struct {
	path string
	f    *os.File
	w    *csv.Writer
	n    int
	done bool
}

var credsColumns = []string{"sn", "imei", "imsi", "msisdn", "alg", "require_encryption", "up", "upexp", "down", "downexp", "bk", "bkexp", "broker_url"}

// createCredsFile creates path with mode 0600, refusing an existing file,
// before anything is sent: the secrets have a place to go.
func createCredsFile(path string) (*credsFile, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	c := &credsFile{path: path, f: f, w: csv.NewWriter(f)}
	c.w.Write(credsColumns)
	return c, nil
}

// write adds a terminal's bundle; an error (a full disk) ends the import.
func (c *credsFile) write(b adminapi.Bundle) error {
	c.w.Write([]string{b.SN, b.IMEI, b.IMSI, b.MSISDN, b.Alg, strconv.FormatBool(b.RequireEncryption),
		b.Up, strconv.FormatUint(uint64(b.UpExp), 10), b.Down, strconv.FormatUint(uint64(b.DownExp), 10),
		b.BK, strconv.FormatUint(uint64(b.BKExp), 10), b.BrokerURL})
	c.w.Flush()
	if err := c.w.Error(); err != nil {
		return fmt.Errorf("writing %s: %w", c.path, err)
	}
	c.n++
	return nil
}

// close syncs and closes the file and says on w what it holds; a file
// that holds no terminal is removed. rep (nil if none came) tells whether
// every terminal stored is in it.
func (c *credsFile) close(w io.Writer, rep *adminapi.ImportReport) error {
	c.done = true
	c.w.Flush()
	err := errors.Join(c.w.Error(), c.f.Sync(), c.f.Close())
	if c.n == 0 && err == nil {
		return os.Remove(c.path)
	}
	if err != nil {
		return fmt.Errorf("--creds-out %s: %w", c.path, err)
	}
	fmt.Fprintf(w, "credentials of %d terminals written to %s (mode 0600): they are shown nowhere else; keep the file safe\n", c.n, c.path)
	if rep != nil && rep.Created > c.n {
		fmt.Fprintf(w, "%d terminals were stored whose credentials are not in %s: rekey them (m2mctl terminal rekey)\n", rep.Created-c.n, c.path)
	}
	return nil
}

// abandon closes a file close did not (an early error), removing it if it
// holds no terminal.
func (c *credsFile) abandon() {
	if c.done {
		return
	}
	c.f.Close()
	if c.n == 0 {
		os.Remove(c.path)
	}
}

// progressBar draws "[#####.....] done/total pct%" on one line of w.
type progressBar struct {
	w     io.Writer
	on    bool
	drawn bool
}

func (p *progressBar) update(done, total int) {
	if !p.on || total <= 0 {
		return
	}
	const width = 30
	filled := done * width / total
	fmt.Fprintf(p.w, "\rimporting [%s%s] %d/%d %3d%%", strings.Repeat("#", filled), strings.Repeat(".", width-filled), done, total, done*100/total)
	p.drawn = true
}

func (p *progressBar) finish() {
	if p.drawn {
		fmt.Fprintln(p.w)
	}
}

func changeCmd(o *options) *cobra.Command {
	cmd := &cobra.Command{Use: "change", Short: "Start a credential change of a terminal or of many (campaign), or show the pending one"}
	var what string
	start := &cobra.Command{
		Use:   "start SN --what pwd|bk|all",
		Short: "Start a platform-initiated change of the passwords (pwd), the basic key (bk) or both (all)",
		Long: `Start a platform-initiated credential change (SPEC section 7). The broker picks the
mode: in ciphertext under the basic key while the terminal is online with its key in
sync, else by SMS if the terminal has an MSISDN and an SMS gateway is configured.
An offline terminal gets the change after its next login. The new values are never
shown: only the change's id, mode and deadline.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			sn, err := snArg(args)
			if err != nil {
				return err
			}
			switch what {
			case "pwd", "bk", "all":
			default:
				return usagef("--what: want pwd, bk or all")
			}
			c, err := o.client()
			if err != nil {
				return err
			}
			ch, err := c.StartChange(cmd.Context(), sn, what)
			if err != nil {
				return err
			}
			return printChange(cmd.OutOrStdout(), o, sn, ch)
		},
	}
	start.Flags().StringVar(&what, "what", "all", "what changes: pwd, bk or all")
	status := &cobra.Command{
		Use:   "status SN",
		Short: "Show the pending change of a terminal (exit 4 if none is pending)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			sn, err := snArg(args)
			if err != nil {
				return err
			}
			c, err := o.client()
			if err != nil {
				return err
			}
			ch, err := c.PendingChange(cmd.Context(), sn)
			if err != nil {
				return err
			}
			return printChange(cmd.OutOrStdout(), o, sn, ch)
		},
	}
	cmd.AddCommand(start, status, campaignCmd(o))
	return cmd
}

func printChange(w io.Writer, o *options, sn string, ch *adminapi.Change) error {
	if o.output == "json" {
		return printJSON(w, ch)
	}
	tw := table(w)
	fmt.Fprintf(tw, "sn\t%s\n", sn)
	fmt.Fprintf(tw, "rid\t%s\n", ch.RID)
	fmt.Fprintf(tw, "what\t%s\n", ch.What)
	fmt.Fprintf(tw, "mode\t%s\n", ch.Mode)
	fmt.Fprintf(tw, "origin\t%s\n", ch.Origin)
	fmt.Fprintf(tw, "started\t%s\n", ts(ch.Started))
	fmt.Fprintf(tw, "deadline\t%s\n", ts(ch.Deadline))
	fmt.Fprintf(tw, "delivered\t%t\n", ch.Delivered)
	return tw.Flush()
}

func sessionCmd(o *options) *cobra.Command {
	cmd := &cobra.Command{Use: "session", Short: "List connected clients, or disconnect one"}
	list := &cobra.Command{
		Use:   "list",
		Short: "List the connected, authenticated clients (terminals and applications; in fleet mode of every broker, with a BROKER column)",
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			out, err := c.SessionList(cmd.Context())
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if o.output == "json" {
				return printJSON(w, out)
			}
			for _, warning := range out.Warnings {
				fmt.Fprintln(cmd.ErrOrStderr(), "warning:", warning)
			}
			fleet := false // a fleet's list names the broker of each session
			for _, s := range out.Sessions {
				fleet = fleet || s.Broker != ""
			}
			tw := table(w)
			if fleet {
				fmt.Fprint(tw, "BROKER\t")
			}
			fmt.Fprintln(tw, "CLIENT ID\tKIND\tREMOTE\tMQTT\tSESSION KEY\tSID\tKEY EXPIRES\tUP SEQ\tDOWN SEQ")
			for _, s := range out.Sessions {
				if fleet {
					fmt.Fprintf(tw, "%s\t", dash(s.Broker))
				}
				mqttv := "3.1.1"
				if s.Protocol == 5 {
					mqttv = "5"
				}
				kind := s.Kind
				if s.App != "" {
					kind += " " + s.App
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%t\t%s\t%s\t%d\t%d\n", s.ClientID, kind, s.Remote, mqttv, s.SessionKey, dash(s.SID), ts(s.KeyExpires), s.UplinkSeq, s.DownSeq)
			}
			return tw.Flush()
		},
	}
	disconnect := &cobra.Command{
		Use:   "disconnect CLIENT_ID",
		Short: "End a client's connection (a terminal may log in again at once: disable it to keep it out)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			if err := c.Disconnect(cmd.Context(), args[0]); err != nil {
				return err
			}
			if o.output == "json" {
				return printJSON(cmd.OutOrStdout(), map[string]string{"disconnected": args[0]})
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s disconnected\n", args[0])
			return nil
		},
	}
	cmd.AddCommand(list, disconnect)
	return cmd
}

func appCmd(o *options) *cobra.Command {
	cmd := &cobra.Command{Use: "app", Short: "Add, remove and list applications (back-end MQTT clients)"}
	var req adminapi.AppRequest
	var pwFile string
	add := &cobra.Command{
		Use:   "add NAME [--password-file FILE] [--subscribe FILTERS] [--publish FILTERS]",
		Short: "Add or replace an application; without --password-file a password is generated and printed once",
		Long: `Add or replace an application: a back-end MQTT client that reads terminal data and
sends commands. It connects with Username NAME and its password, and a ClientID of
its own: NAME followed by '-' and anything (e.g. "dash-1"), NAME itself unless that is a
valid serial number (1-16 of [A-Za-z0-9]: such ClientIDs are terminals'), or none (the
broker assigns one). No NAME may be another application's followed by '-' ("dash" and
"dash-east"): such a name is refused (exit 5). By default it may subscribe to m2m/+/up/#
and publish to m2m/+/down/#.

--subscribe '$m2m/events/#' (or a narrower filter under $m2m/events/) lets it read the
terminals' presence and security events (docs/EVENTS.md): connects, disconnects, refused
logins, binding mismatches, credential changes. That is the broker's security log per
terminal: grant it like read access to the log. No other $ topic may be granted.

Without --password-file the broker generates a password and this command prints it
once (or give it in $M2MCTL_APP_PASSWORD).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req.Name = args[0]
			req.Password = os.Getenv("M2MCTL_APP_PASSWORD")
			if pwFile != "" {
				data, err := os.ReadFile(pwFile)
				if err != nil {
					return usagef("--password-file: %v", err)
				}
				req.Password = strings.TrimRight(string(data), "\r\n")
			}
			c, err := o.client()
			if err != nil {
				return err
			}
			app, err := c.AddApp(cmd.Context(), req)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if o.output == "json" {
				return printJSON(w, app)
			}
			tw := table(w)
			fmt.Fprintf(tw, "name\t%s\n", app.Name)
			if app.Password != "" {
				fmt.Fprintf(tw, "password\t%s\t(generated; shown once)\n", app.Password)
			}
			fmt.Fprintf(tw, "subscribe\t%s\n", strings.Join(app.Subscribe, ", "))
			fmt.Fprintf(tw, "publish\t%s\n", strings.Join(app.Publish, ", "))
			return tw.Flush()
		},
	}
	add.Flags().StringVar(&pwFile, "password-file", "", "file holding the password (12-128 bytes) [$M2MCTL_APP_PASSWORD]")
	add.Flags().StringSliceVar(&req.Subscribe, "subscribe", nil, "topic filters it may subscribe to (default m2m/+/up/#; '$m2m/events/#' for the terminals' events)")
	add.Flags().StringSliceVar(&req.Publish, "publish", nil, "topic filters it may publish to (default m2m/+/down/#)")
	remove := &cobra.Command{
		Use:   "remove NAME",
		Short: "Remove an application (connected clients keep their session until they disconnect)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			if err := c.RemoveApp(cmd.Context(), args[0]); err != nil {
				return err
			}
			if o.output == "json" {
				return printJSON(cmd.OutOrStdout(), map[string]string{"removed": args[0]})
			}
			fmt.Fprintf(cmd.OutOrStdout(), "application %s removed\n", args[0])
			return nil
		},
	}
	list := &cobra.Command{
		Use:   "list",
		Short: "List the applications",
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			apps, err := c.Apps(cmd.Context())
			if err != nil {
				return err
			}
			out := adminapi.AppList{Apps: apps}
			w := cmd.OutOrStdout()
			if o.output == "json" {
				return printJSON(w, out)
			}
			fmt.Fprintln(w, "NAME")
			for _, n := range out.Apps {
				fmt.Fprintln(w, n)
			}
			return nil
		},
	}
	cmd.AddCommand(add, remove, list)
	return cmd
}
