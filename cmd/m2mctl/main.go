// Command m2mctl drives the admin API of an m2mguard broker from a
// terminal: terminals, credential changes, sessions and applications.
//
//	m2mctl terminal add --sn A1 --imei 354494040518570 --imsi 460020084678120 --creds a1.json
//	m2mctl terminal list
//	m2mctl change start A1 --what all
//	m2mctl session list -o json
//	m2mctl report not-seen --since 2025-03-01 -o csv
//
// Output is a table for people, or JSON with -o json. The server and token
// come from --server/$M2MCTL_SERVER (default http://127.0.0.1:8080) and
// --token/$M2MCTL_TOKEN, else --token-file/$M2MCTL_TOKEN_FILE (default
// ./data/admin.token, the file the broker generates on first run).
//
// Exit codes: 0 ok, 1 other failure (import: some rows rejected), 2 usage
// error or bad input (HTTP 400), 3 unauthorized (401) or a read-only
// operator's change (403), 4 not found (404),
// 5 conflict: exists or a change pending (409), 6 broker unreachable, not
// an m2mguard admin API, or store unavailable (503). With -o json, errors
// are JSON on stderr.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/internal/cliflag"
)

// Exit codes.
const (
	exitOK          = 0
	exitFailure     = 1
	exitUsage       = 2
	exitUnauthorize = 3
	exitNotFound    = 4
	exitConflict    = 5
	exitUnavailable = 6
)

const exitHelp = `Exit codes:
  0  ok
  1  other failure (terminal import: at least one row was rejected)
  2  usage error, or input the broker refused (HTTP 400)
  3  unauthorized: missing or wrong admin token (HTTP 401), or a change asked with
     a read-only operator's token (HTTP 403)
  4  not found (HTTP 404)
  5  conflict: the terminal or app exists, or a change is already pending (HTTP 409)
  6  broker unreachable (or --server is not an m2mguard admin API), or its store
     unavailable (HTTP 503)

With -o json an error is JSON on stderr: {"error": "...", "status": <HTTP status>, "exit": <code>}.`

// DefaultServer is the admin API address the broker listens on by default.
const DefaultServer = "http://127.0.0.1:8080"

var usagef = cliflag.Usagef

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// options are the global flags.
type options struct {
	server      string
	token       string
	tokenFrom   string // where token came from: "--token" or "$M2MCTL_TOKEN"
	tokenFile   string
	tokenSource string // where the token sent came from: tokenFrom or "token file PATH" (set by client)
	output      string
	timeout     time.Duration
	stdin       io.Reader
	stderrTTY   bool
}

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	o := &options{stdin: stdin}
	if f, ok := stderr.(*os.File); ok {
		if fi, err := f.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
			o.stderrTTY = true
		}
	}
	root := &cobra.Command{
		Use:   "m2mctl",
		Short: "Operate an m2mguard broker through its admin API",
		Long: `m2mctl drives the admin HTTP API of an m2mguard broker: terminals (add, get,
list, disable, enable, delete, import), credential changes (start, status),
sessions (list, disconnect), applications (add, remove, list), reports of the fleet
(expiring credentials, terminals never or not lately seen) and operators' tokens.

Tables for people, JSON for scripts (-o json). The broker's admin API listens on
127.0.0.1:8080 by default and needs its bearer token: --token or $M2MCTL_TOKEN,
else the file --token-file (default ./data/admin.token, which the broker writes on
first run; run m2mctl from the broker's working directory, or point to it).

Secrets are shown in few places, by design: 'terminal add' and 'terminal rekey'
print the provisioning bundle (passwords and basic key) a factory writes into the
device, once; 'terminal import --creds-out FILE' writes the bundles of the terminals
it stored to a new 0600 file; 'token new' prints an operator's token once. Nothing
else ever shows a secret; the broker cannot show them again.

` + exitHelp,
	}
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetContext(ctx)
	pf := root.PersistentFlags()
	pf.StringVar(&o.server, "server", DefaultServer, "admin API base URL")
	pf.StringVar(&o.token, "token", "", "admin bearer token (overrides --token-file)")
	pf.StringVar(&o.tokenFile, "token-file", "./data/admin.token", "file holding the admin token")
	pf.StringVarP(&o.output, "output", "o", "table", "output format: table or json (reports: csv too)")
	pf.DurationVar(&o.timeout, "timeout", 30*time.Second, "timeout of one request (imports: of the connection, not the upload)")
	envErr := cliflag.EnvAll(pf, map[string]string{
		"server": "M2MCTL_SERVER", "token": "M2MCTL_TOKEN", "token-file": "M2MCTL_TOKEN_FILE", "output": "M2MCTL_OUTPUT",
	})

	root.AddCommand(terminalCmd(o), changeCmd(o), sessionCmd(o), appCmd(o), reportCmd(o), whoamiCmd(o), tokenCmd(o))
	cliflag.Prepare(root, exitHelp, envErr)
	root.PersistentPreRunE = func(cmd *cobra.Command, args []string) error {
		switch o.output {
		case "table", "json":
		case "csv":
			if cmd.Annotations[csvAllowed] == "" {
				return usagef("--output csv: only for reports; want table or json")
			}
		default:
			return usagef("--output: want table or json (reports: csv too)")
		}
		o.tokenFrom = "$M2MCTL_TOKEN"
		if pf.Changed("token") {
			o.tokenFrom = "--token"
		}
		return nil
	}

	err := root.Execute()
	if err == nil {
		return exitOK
	}
	err = o.explain(err)
	code := exitCode(err)
	if o.output == "json" {
		printJSONError(stderr, err)
		return code
	}
	fmt.Fprintln(stderr, "m2mctl:", err)
	if code == exitUsage && cliflag.IsUsage(err) {
		fmt.Fprintln(stderr, "Run 'm2mctl --help' for usage.")
	}
	return code
}

// exitCode maps an error to the exit code of the help text.
func exitCode(err error) int {
	switch {
	case cliflag.IsUsage(err), errors.Is(err, adminapi.ErrBadRequest):
		return exitUsage
	case errors.Is(err, adminapi.ErrUnauthorized), errors.Is(err, adminapi.ErrForbidden):
		return exitUnauthorize
	case errors.Is(err, adminapi.ErrNotFound):
		return exitNotFound
	case errors.Is(err, adminapi.ErrConflict):
		return exitConflict
	case errors.Is(err, adminapi.ErrUnavailable), errors.Is(err, adminapi.ErrUnreachable), errors.Is(err, adminapi.ErrNotAdminAPI):
		return exitUnavailable
	}
	return exitFailure
}

// printJSONError writes err as {"error": ..., "status": ..., "field": ...}
// on w (-o json): status is the HTTP status of an API answer, omitted when
// there was none.
func printJSONError(w io.Writer, err error) {
	out := struct {
		Error  string `json:"error"`
		Status int    `json:"status,omitempty"`
		Field  string `json:"field,omitempty"`
		Exit   int    `json:"exit"`
	}{Error: err.Error(), Exit: exitCode(err)}
	var ae *adminapi.Error
	if errors.As(err, &ae) {
		out.Error, out.Status, out.Field = ae.Text(), ae.Status, ae.Field
	}
	printJSON(w, out)
}
