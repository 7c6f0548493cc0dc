// Command m2m-terminal is the M2M1 reference terminal on the command line:
// it logs in to an m2mguard broker with the credentials of a credential
// file (the one 'm2mctl terminal add --creds' writes, which also names the
// broker), publishes and receives data, and requests credential changes.
//
//	m2m-terminal connect                       stay connected, print events
//	m2m-terminal pub <sub> <payload|->         publish one uplink message
//	m2m-terminal sub                           print downlink data
//	m2m-terminal rotate --what all --mode cipher
//	m2m-terminal status                        what the credential file holds (no secrets)
//
// Every flag has an environment variable fallback (M2M_BROKER, M2M_SN,
// M2M_IMEI, M2M_IMSI, M2M_ALG, M2M_CREDS, ...; see --help).
//
// Exit codes: 0 ok, 1 other failure, 2 usage error, 3 credentials refused
// by the broker, 4 broker unreachable.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/codec"
	"github.com/m2mguard/m2mguard/internal/cliflag"
)

// Exit codes.
const (
	exitOK          = 0
	exitFailure     = 1
	exitUsage       = 2
	exitRefused     = 3
	exitUnreachable = 4
)

const exitHelp = `Exit codes:
  0  ok
  1  other failure
  2  usage error (bad flag, argument or configuration)
  3  credentials refused by the broker (CONNACK 0x04/0x05; 0x86/0x87/0x8A under MQTT 5)
  4  broker unreachable (network, TLS, timeout, server unavailable)`

var usagef = cliflag.Usagef

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// options are the global flags.
type options struct {
	brokers        []string
	sn, imei, imsi string
	alg            string
	creds          string
	sessionKey     bool
	caFile         string
	timeout        time.Duration
	smsGateway     string
	msisdn         string
	platformNumber string
	verbose        bool
}

// run executes the command line and returns the exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var o options
	root := &cobra.Command{
		Use:   "m2m-terminal",
		Short: "M2M1 reference terminal: log in, publish, receive, change credentials",
		Long: `m2m-terminal is a cellular M2M terminal speaking M2M1 (docs/SPEC.md) to an m2mguard
broker. It logs in with a fresh password token on every connection attempt,
verifies every control message of the platform, uses a session key when asked
(--session-key), and applies credential changes, keeping the credential file
(--creds, JSON, mode 0600) safe against power cuts.

Broker URLs: tcp://host:1883, ssl://host:8883, ws://host/mqtt, wss://host/mqtt.
The broker, sn, IMEI, IMSI and alg default to the values stored in the credential
file ('m2mctl terminal add --creds FILE' writes them all).

` + exitHelp,
	}
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetContext(ctx)
	pf := root.PersistentFlags()
	pf.StringSliceVar(&o.brokers, "broker", nil, "broker URL(s), comma-separated, tried in order (default: the credential file's)")
	pf.StringVar(&o.sn, "sn", "", "serial number (1-16 of [A-Za-z0-9])")
	pf.StringVar(&o.imei, "imei", "", "IMEI (14-16 digits)")
	pf.StringVar(&o.imsi, "imsi", "", "IMSI (6-15 digits)")
	pf.StringVar(&o.alg, "alg", "", "digest algorithm: md5 or hs256 (default: the credential file's, else hs256)")
	pf.StringVar(&o.creds, "creds", "", "credential file (JSON, mode 0600)")
	pf.BoolVar(&o.sessionKey, "session-key", false, "ask for a session key and encrypt data")
	pf.StringVar(&o.caFile, "ca-file", "", "PEM CA bundle for ssl:// and wss:// brokers (default: system roots)")
	pf.DurationVar(&o.timeout, "timeout", 30*time.Second, "how long to wait for the connection (and for pub, rotate)")
	pf.StringVar(&o.smsGateway, "sms-gateway", "", "SMS test gateway base URL, for changes by SMS")
	pf.StringVar(&o.msisdn, "msisdn", "", "the terminal's MSISDN on the SMS gateway")
	pf.StringVar(&o.platformNumber, "platform-number", "", "the platform's SMS sender number")
	pf.BoolVarP(&o.verbose, "verbose", "v", false, "log diagnostics to stderr (never secrets)")
	envErr := cliflag.EnvAll(pf, map[string]string{
		"broker": "M2M_BROKER", "sn": "M2M_SN", "imei": "M2M_IMEI", "imsi": "M2M_IMSI", "alg": "M2M_ALG",
		"creds": "M2M_CREDS", "session-key": "M2M_SESSION_KEY", "ca-file": "M2M_CA_FILE", "timeout": "M2M_TIMEOUT",
		"sms-gateway": "M2M_SMS_GATEWAY", "msisdn": "M2M_MSISDN", "platform-number": "M2M_PLATFORM_NUMBER",
	})

	root.AddCommand(connectCmd(&o), pubCmd(&o), subCmd(&o), rotateCmd(&o), statusCmd(&o))
	cliflag.Prepare(root, exitHelp, envErr)

	err := root.Execute()
	if err == nil {
		return exitOK
	}
	fmt.Fprintln(stderr, "m2m-terminal:", err)
	switch {
	case cliflag.IsUsage(err):
		fmt.Fprintln(stderr, "Run 'm2m-terminal --help' for usage.")
		return exitUsage
	case errors.Is(err, client.ErrRefused):
		return exitRefused
	case errors.Is(err, client.ErrUnreachable):
		return exitUnreachable
	}
	return exitFailure
}

// terminal is a configured client with event and data output.
type terminal struct {
	c      *client.Client
	events chan client.Event
}

// loadCreds opens the credential file of --creds. A missing or damaged
// file is a usage error naming it; a file that group or others may read is
// used, with a warning on stderr.
func loadCreds(cmd *cobra.Command, o *options) (*client.FileStore, *client.Record, error) {
	if o.creds == "" {
		return nil, nil, usagef("--creds (or $M2M_CREDS) is required: the credential file 'm2mctl terminal add --creds' writes")
	}
	store := client.NewFileStore(o.creds)
	rec, err := store.Load()
	switch {
	case errors.Is(err, client.ErrNoCredentials):
		return nil, nil, usagef("credential file %s does not exist (write it with 'm2mctl terminal add --creds %s')", o.creds, o.creds)
	case errors.Is(err, fs.ErrPermission):
		return nil, nil, usagef("credential file %s cannot be read: permission denied", o.creds)
	case err != nil:
		var pe *fs.PathError
		if errors.As(err, &pe) { // a directory, an I/O error
			return nil, nil, usagef("credential file %s cannot be read: %v", o.creds, pe.Err)
		}
		return nil, nil, usagef("credential file %s is not valid: %s", o.creds, strings.TrimPrefix(err.Error(), "client: credential file: "))
	}
	if fi, err := os.Stat(o.creds); err == nil && fi.Mode().Perm()&0o077 != 0 {
		fmt.Fprintf(cmd.ErrOrStderr(), "m2m-terminal: warning: credential file %s holds secrets but has mode %04o (readable by group or others); chmod 600 %s\n",
			o.creds, fi.Mode().Perm(), o.creds)
	}
	return store, rec, nil
}

// newTerminal builds the client from the flags.
func newTerminal(cmd *cobra.Command, o *options, onData func(string, []byte)) (*terminal, error) {
	store, rec, err := loadCreds(cmd, o)
	if err != nil {
		return nil, err
	}
	brokers := o.brokers
	if len(brokers) == 0 && rec.BrokerURL != "" {
		brokers = []string{rec.BrokerURL}
	}
	if len(brokers) == 0 {
		return nil, usagef("--broker (or $M2M_BROKER) is required: credential file %s names no broker", o.creds)
	}
	id := rec.Identity
	if o.sn != "" {
		id.SN = o.sn
	}
	if o.imei != "" {
		id.IMEI = o.imei
	}
	if o.imsi != "" {
		id.IMSI = o.imsi
	}
	if err := id.Validate(); err != nil {
		return nil, usagef("identity (--sn, --imei, --imsi): %v", err)
	}
	alg := rec.Alg
	if o.alg != "" {
		if alg, err = codec.ParseAlg(o.alg); err != nil {
			return nil, usagef("--alg: want md5 or hs256")
		}
	}
	if alg == 0 {
		alg = codec.HS256
	}
	cfg := client.Config{
		Brokers: brokers, Identity: id, Alg: alg, Store: store, SessionKey: o.sessionKey,
		OnData: onData, ConnectTimeout: min(o.timeout, 30*time.Second),
	}
	if o.caFile != "" {
		pem, err := os.ReadFile(o.caFile)
		if err != nil {
			return nil, usagef("--ca-file: %v", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, usagef("--ca-file: no certificate found")
		}
		cfg.TLS = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	if o.smsGateway != "" {
		if o.msisdn == "" || o.platformNumber == "" {
			return nil, usagef("--sms-gateway needs --msisdn and --platform-number")
		}
		cfg.SMS = &client.GatewayInbox{URL: o.smsGateway, MSISDN: o.msisdn}
		cfg.PlatformNumber = o.platformNumber
	}
	if o.verbose {
		cfg.Logger = slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
	}
	t := &terminal{events: make(chan client.Event, 64)}
	cfg.OnEvent = func(e client.Event) {
		select {
		case t.events <- e:
		default: // nobody listening and the buffer is full: drop
		}
	}
	c, err := client.New(cfg)
	if err != nil {
		return nil, cliflag.UsageError{Err: err}
	}
	t.c = c
	return t, nil
}

// connect connects within the --timeout.
func (t *terminal) connect(ctx context.Context, o *options) error {
	cctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	err := t.c.Connect(cctx)
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%w: no answer within %s", client.ErrUnreachable, o.timeout)
	}
	return err
}

func printEvent(w io.Writer, e client.Event) {
	fmt.Fprintf(w, "%s  %s\n", e.Time.Local().Format("15:04:05"), e)
}

func connectCmd(o *options) *cobra.Command {
	return &cobra.Command{
		Use:   "connect",
		Short: "Log in and stay connected, printing events until interrupted",
		RunE: func(cmd *cobra.Command, _ []string) error {
			return stayConnected(cmd, o, "data %s: %s\n", cmd.OutOrStdout())
		},
	}
}

// stayConnected logs in and prints downlink data (with dataFormat, of the
// sub-topic and payload) on stdout and events on events, until the
// command's context ends.
func stayConnected(cmd *cobra.Command, o *options, dataFormat string, events io.Writer) error {
	t, err := newTerminal(cmd, o, func(sub string, p []byte) {
		fmt.Fprintf(cmd.OutOrStdout(), dataFormat, sub, p)
	})
	if err != nil {
		return err
	}
	defer t.c.Close()
	if err := t.connect(cmd.Context(), o); err != nil {
		return err
	}
	for {
		select {
		case e := <-t.events:
			printEvent(events, e)
		case <-cmd.Context().Done():
			return nil
		}
	}
}

func subCmd(o *options) *cobra.Command {
	return &cobra.Command{
		Use:   "sub",
		Short: "Print downlink data (one line per message: <sub>: <payload>) until interrupted; events go to stderr",
		RunE: func(cmd *cobra.Command, _ []string) error {
			return stayConnected(cmd, o, "%s: %s\n", cmd.ErrOrStderr())
		},
	}
}

func pubCmd(o *options) *cobra.Command {
	var qos int
	cmd := &cobra.Command{
		Use:   "pub <sub> <payload|->",
		Short: "Publish one uplink message on m2m/<sn>/up/<sub> (payload '-' reads stdin)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if qos < 0 || qos > 2 {
				return usagef("--qos must be 0, 1 or 2")
			}
			payload := []byte(args[1])
			if args[1] == "-" {
				var err error
				if payload, err = io.ReadAll(io.LimitReader(cmd.InOrStdin(), 256<<10)); err != nil {
					return err
				}
			}
			t, err := newTerminal(cmd, o, nil)
			if err != nil {
				return err
			}
			defer t.c.Close()
			if err := t.connect(cmd.Context(), o); err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), o.timeout)
			defer cancel()
			if err := t.c.Publish(ctx, args[0], payload, byte(qos)); err != nil {
				return err
			}
			si := t.c.Session()
			how := "plaintext"
			if si.Encrypted {
				how = fmt.Sprintf("envelope seq %d", si.UplinkSeq)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "published %d bytes on up/%s (%s, qos %d)\n", len(payload), args[0], how, qos)
			return nil
		},
	}
	cmd.Flags().IntVar(&qos, "qos", 1, "MQTT QoS: 0, 1 or 2")
	return cmd
}

func rotateCmd(o *options) *cobra.Command {
	var what, mode string
	var wait bool
	cmd := &cobra.Command{
		Use:   "rotate",
		Short: "Request a change of the passwords, the basic key or both, and wait until it is committed",
		RunE: func(cmd *cobra.Command, _ []string) error {
			w := codec.What(what)
			if w != codec.WhatPwd && w != codec.WhatBK && w != codec.WhatAll {
				return usagef("--what must be pwd, bk or all")
			}
			m := codec.Mode(mode)
			if m != codec.ModeCipher && m != codec.ModeSMS {
				return usagef("--mode must be cipher or sms")
			}
			t, err := newTerminal(cmd, o, nil)
			if err != nil {
				return err
			}
			defer t.c.Close()
			if err := t.connect(cmd.Context(), o); err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), o.timeout)
			defer cancel()
			rid, err := t.c.RequestChange(ctx, w, m)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "change %s accepted by the platform\n", rid)
			if !wait {
				return nil
			}
			for {
				select {
				case e := <-t.events:
					printEvent(out, e)
					switch {
					case e.Kind == client.EventChangeCommitted && e.RID == rid:
						fmt.Fprintf(out, "change %s committed\n", rid)
						return nil
					case e.Kind == client.EventChangeDiscarded && e.RID == rid:
						return fmt.Errorf("change %s discarded: %s", rid, e.Reason)
					}
				case <-ctx.Done():
					return fmt.Errorf("change %s not committed within %s (it stays pending in the credential file)", rid, o.timeout)
				}
			}
		},
	}
	cmd.Flags().StringVar(&what, "what", "all", "what to change: pwd, bk or all")
	cmd.Flags().StringVar(&mode, "mode", "cipher", "how to deliver the new values: cipher or sms (the platform decides)")
	cmd.Flags().BoolVar(&wait, "wait", true, "wait until the change is committed")
	return cmd
}

func statusCmd(o *options) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show what the credential file holds: identity, alg, expiries, pending change (never the secrets)",
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, rec, err := loadCreds(cmd, o)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "credential file  %s\n", o.creds)
			if rec.BrokerURL != "" {
				fmt.Fprintf(w, "broker           %s\n", rec.BrokerURL)
			}
			if rec.Identity.SN != "" {
				fmt.Fprintf(w, "sn               %s\n", rec.Identity.SN)
				fmt.Fprintf(w, "imei / imsi      %s / %s\n", rec.Identity.IMEI, rec.Identity.IMSI)
			}
			if rec.Alg != 0 {
				fmt.Fprintf(w, "alg              %s\n", rec.Alg)
			}
			fmt.Fprintf(w, "uplink password  expires %s\n", expiry(rec.Current.UpExp))
			fmt.Fprintf(w, "downlink passwd  expires %s\n", expiry(rec.Current.DownExp))
			if len(rec.Current.BK) == 0 {
				fmt.Fprintf(w, "basic key        none\n")
			} else {
				fmt.Fprintf(w, "basic key        held, expires %s\n", expiry(rec.Current.BKExp))
			}
			if p := rec.Pending; p != nil {
				fmt.Fprintf(w, "pending change   rid %s, what %s, mode %s, received %s\n", p.RID, p.Params.What,
					orDash(string(p.Mode)), p.Received.Local().Format(time.RFC3339))
			} else {
				fmt.Fprintf(w, "pending change   none\n")
			}
			return nil
		},
	}
}

func expiry(u uint32) string {
	if u == codec.Never {
		return "never"
	}
	return time.Unix(int64(u), 0).Local().Format(time.RFC3339)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
