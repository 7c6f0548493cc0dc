package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/m2mguard/m2mguard/adminapi"
	"github.com/m2mguard/m2mguard/codec"
)

// ratePresets are the named rates of --rate, in changes started per
// second.
var ratePresets = map[string]float64{"low": 1, "medium": 10, "high": 100}

// parseRate reads --rate: a number of changes per second, or low, medium
// or high.
func parseRate(s string) (float64, error) {
	if r, ok := ratePresets[strings.ToLower(s)]; ok {
		return r, nil
	}
	r, err := strconv.ParseFloat(s, 64)
	if err != nil || !(r > 0) {
		return 0, usagef("--rate: want changes per second (a number above 0), or low (1), medium (10) or high (100)")
	}
	return r, nil
}

// readList reads the serial numbers of a list file: one per line; blank
// lines and lines starting with '#' are skipped.
func readList(r io.Reader, name string) ([]string, error) {
	var sns []string
	sc := bufio.NewScanner(r)
	for line := 1; sc.Scan(); line++ {
		sn := strings.TrimSpace(sc.Text())
		if sn == "" || strings.HasPrefix(sn, "#") {
			continue
		}
		if codec.ValidateSN(sn) != nil {
			return nil, usagef("--list %s line %d: %q is not a serial number (1 to 16 of [A-Za-z0-9])", name, line, sn)
		}
		sns = append(sns, sn)
	}
	if err := sc.Err(); err != nil {
		return nil, usagef("--list %s: %v", name, err)
	}
	if len(sns) == 0 {
		return nil, usagef("--list %s holds no serial number", name)
	}
	return sns, nil
}

func campaignCmd(o *options) *cobra.Command {
	cmd := &cobra.Command{Use: "campaign", Short: "Change the credentials of many terminals: start, status, list, cancel"}
	cmd.AddCommand(campaignStartCmd(o), campaignStatusCmd(o), campaignListCmd(o), campaignCancelCmd(o))
	return cmd
}

func campaignStartCmd(o *options) *cobra.Command {
	var all bool
	var before, list, status, what, rate string
	cmd := &cobra.Command{
		Use:   "start (--all | --expiring-before DATE | --list FILE | --status STATUS) --what pwd|bk|all [--rate N|low|medium|high]",
		Short: "Start a credential change for every terminal of a selection, at a bounded rate",
		Long: `Start a campaign: the broker walks the selection in serial-number order and starts a
platform-initiated change (as 'change start' does) for each terminal, at most --rate
per second (low 1, medium 10, high 100; the broker's campaigns.max_rate caps it).
An online terminal gets its new values at once, an offline one at its next login.
Exactly one selection:

  --all                    every terminal
  --expiring-before DATE   terminals with a credential the change replaces (--what)
                           expiring before DATE (2026-01-31 or an RFC 3339 time)
  --list FILE              the serial numbers in FILE, one per line ('-' = stdin)
  --status STATUS          terminals whose status is active or disabled

A terminal with a change already pending is skipped (busy), a disabled one too
(inactive). The campaign survives a restart of the broker: it goes on where it
stopped, and starts no second change for a terminal. Follow it with
'change campaign status ID'; one campaign at a time may be starting changes.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			req := adminapi.CampaignRequest{What: what}
			n := 0
			if all {
				n++
				req.Select = "all"
			}
			if before != "" {
				n++
				req.Select, req.Before = "expiring", before
			}
			if status != "" {
				n++
				req.Select, req.Status = "status", status
			}
			if list != "" {
				n++
				req.Select = "list"
				in, name := io.Reader(o.stdin), "(stdin)"
				if list != "-" {
					f, err := os.Open(list)
					if err != nil {
						return usagef("--list: %v", err)
					}
					defer f.Close()
					in, name = f, list
				}
				sns, err := readList(in, name)
				if err != nil {
					return err
				}
				req.SNs = sns
			}
			if n != 1 {
				return usagef("give exactly one selection: --all, --expiring-before, --list or --status")
			}
			switch what {
			case "pwd", "bk", "all":
			default:
				return usagef("--what: want pwd, bk or all")
			}
			r, err := parseRate(rate)
			if err != nil {
				return err
			}
			req.Rate = r
			c, err := o.client()
			if err != nil {
				return err
			}
			camp, err := c.StartCampaign(cmd.Context(), req)
			if err != nil {
				return err
			}
			return printCampaign(cmd.OutOrStdout(), o, camp)
		},
	}
	f := cmd.Flags()
	f.BoolVar(&all, "all", false, "every terminal")
	f.StringVar(&before, "expiring-before", "", "terminals with a credential the change replaces expiring before this date")
	f.StringVar(&list, "list", "", "file of serial numbers, one per line ('-' = stdin)")
	f.StringVar(&status, "status", "", "terminals of this status: active or disabled")
	f.StringVar(&what, "what", "", "what changes: pwd, bk or all (required)")
	f.StringVar(&rate, "rate", "medium", "changes started per second: a number, or low (1), medium (10), high (100)")
	return cmd
}

func campaignStatusCmd(o *options) *cobra.Command {
	var outcome string
	cmd := &cobra.Command{
		Use:   "status ID [--outcome OUTCOME]",
		Short: "Show a campaign's progress: its state and its terminals counted by outcome",
		Long: `Show a campaign's progress: its state (running: starting changes; tracking: every
terminal handled, following the changes; done; cancelled), its cursor (the last serial
number handled) and its terminals by outcome:

  waiting    started; not delivered yet (offline: it goes out at its next login)
  delivered  new values sent; not acknowledged yet
  committed  acknowledged and committed
  expired    passed its deadline (or was cancelled) uncommitted: the old values stay
  busy       skipped: another change was pending
  inactive   skipped: the terminal is disabled
  failed     no change started (the reason says why)

The serial numbers of the outcomes that need attention follow (the first 20 of each);
--outcome lists every terminal of one outcome instead.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if outcome != "" {
				var out []adminapi.CampaignTerminal
				for t, err := range c.AllCampaignTerminals(cmd.Context(), args[0], outcome) {
					if err != nil {
						return err
					}
					out = append(out, t)
				}
				if o.output == "json" {
					return printJSON(w, adminapi.CampaignTerminalList{Terminals: append([]adminapi.CampaignTerminal{}, out...)})
				}
				tw := table(w)
				fmt.Fprintln(tw, "SN\tOUTCOME\tRID\tREASON")
				for _, t := range out {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", t.SN, t.Outcome, dash(t.RID), dash(t.Reason))
				}
				return tw.Flush()
			}
			camp, err := c.Campaign(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if o.output == "json" {
				return printJSON(w, camp)
			}
			if err := printCampaign(w, o, camp); err != nil {
				return err
			}
			counts := map[string]int{"waiting": camp.Counts.Waiting, "expired": camp.Counts.Expired, "busy": camp.Counts.Busy,
				"inactive": camp.Counts.Inactive, "failed": camp.Counts.Failed}
			for _, oc := range []string{"waiting", "expired", "busy", "inactive", "failed"} {
				if counts[oc] == 0 {
					continue
				}
				page, err := c.CampaignTerminals(cmd.Context(), camp.ID, oc, "", 20)
				if err != nil {
					return err
				}
				sns := make([]string, 0, len(page.Terminals))
				for _, t := range page.Terminals {
					sns = append(sns, t.SN)
				}
				more := ""
				if counts[oc] > len(sns) {
					more = fmt.Sprintf(" and %d more (--outcome %s)", counts[oc]-len(sns), oc)
				}
				fmt.Fprintf(w, "%s: %s%s\n", oc, strings.Join(sns, " "), more)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&outcome, "outcome", "", "list the terminals of this outcome")
	return cmd
}

func campaignListCmd(o *options) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List the campaigns",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			cs, err := c.Campaigns(cmd.Context())
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if o.output == "json" {
				return printJSON(w, adminapi.CampaignList{Campaigns: append([]adminapi.Campaign{}, cs...)})
			}
			tw := table(w)
			fmt.Fprintln(tw, "ID\tSELECT\tWHAT\tSTATE\tHANDLED\tCOMMITTED\tOUTSTANDING\tCREATED")
			for _, c := range cs {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%d\t%s\n", c.ID, c.Select, c.What, c.State, c.Handled,
					c.Counts.Committed, c.Counts.Waiting+c.Counts.Delivered, ts(c.Created))
			}
			return tw.Flush()
		},
	}
}

func campaignCancelCmd(o *options) *cobra.Command {
	return &cobra.Command{
		Use:   "cancel ID",
		Short: "Stop a campaign from starting more changes (those started go on; exit 5 if it is done)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			camp, err := c.CancelCampaign(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return printCampaign(cmd.OutOrStdout(), o, camp)
		},
	}
}

func printCampaign(w io.Writer, o *options, c *adminapi.Campaign) error {
	if o.output == "json" {
		return printJSON(w, c)
	}
	tw := table(w)
	fmt.Fprintf(tw, "id\t%s\n", c.ID)
	sel := c.Select
	switch c.Select {
	case "expiring":
		sel += " before " + c.Before
	case "status":
		sel += " " + c.Status
	case "list":
		sel += fmt.Sprintf(" of %d", c.ListSize)
	}
	fmt.Fprintf(tw, "select\t%s\n", sel)
	fmt.Fprintf(tw, "what\t%s\n", c.What)
	fmt.Fprintf(tw, "rate\t%g per second\n", c.Rate)
	fmt.Fprintf(tw, "state\t%s\n", c.State)
	fmt.Fprintf(tw, "cursor\t%s\n", dash(c.Cursor))
	fmt.Fprintf(tw, "handled\t%d\n", c.Handled)
	k := c.Counts
	for _, x := range []struct {
		name string
		n    int
	}{{"waiting", k.Waiting}, {"delivered", k.Delivered}, {"committed", k.Committed}, {"expired", k.Expired},
		{"busy", k.Busy}, {"inactive", k.Inactive}, {"failed", k.Failed}} {
		fmt.Fprintf(tw, "  %s\t%d\n", x.name, x.n)
	}
	fmt.Fprintf(tw, "created\t%s\n", ts(c.Created))
	if !c.Finished.IsZero() {
		fmt.Fprintf(tw, "finished\t%s\n", ts(c.Finished))
	}
	return tw.Flush()
}
