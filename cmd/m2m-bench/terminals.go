package main

import (
	"crypto/rand"
	"encoding/csv"
	"encoding/hex"
	"fmt"
	"io"
	"math/big"
	"strings"

	"github.com/m2mguard/m2mguard/client"
	"github.com/m2mguard/m2mguard/codec"
)

// Terminal is one benchmark terminal with its secrets, as the CSV of the
// gen subcommand carries it (the import format of keysvc.Service.Import:
// sn,imei,imsi,msisdn,alg,up,down,bk).
type Terminal struct {
	ID       codec.Identity
	Up, Down []byte
	BK       []byte
}

// Record returns the client's credential record of t (imported secrets
// never expire).
func (t *Terminal) Record() *client.Record {
	return &client.Record{Identity: t.ID, Alg: codec.HS256, Current: client.Credentials{
		Up: append([]byte(nil), t.Up...), UpExp: codec.Never,
		Down: append([]byte(nil), t.Down...), DownExp: codec.Never,
		BK: append([]byte(nil), t.BK...), BKExp: codec.Never,
	}}
}

const csvHeader = "sn,imei,imsi,msisdn,alg,up,down,bk"

// benchSN names the i-th benchmark terminal.
func benchSN(i int) string { return fmt.Sprintf("BENCH%08d", i) }

const alnum = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

func randPassword() []byte {
	p := make([]byte, 16)
	for i := range p {
		n, err := rand.Int(rand.Reader, big.NewInt(int64(len(alnum))))
		if err != nil {
			panic(err)
		}
		p[i] = alnum[n.Int64()]
	}
	return p
}

// genTerminals returns n terminals with fresh random secrets.
func genTerminals(n int) []*Terminal {
	ts := make([]*Terminal, n)
	for i := range ts {
		bk := make([]byte, codec.BasicKeySize)
		rand.Read(bk)
		ts[i] = &Terminal{
			ID: codec.Identity{SN: benchSN(i), IMEI: fmt.Sprintf("35693803%07d", i%10_000_000),
				IMSI: fmt.Sprintf("46000%010d", i)},
			Up: randPassword(), Down: randPassword(), BK: bk,
		}
	}
	return ts
}

// writeTerminals writes ts as import CSV.
func writeTerminals(w io.Writer, ts []*Terminal) error {
	cw := csv.NewWriter(w)
	cw.Write(strings.Split(csvHeader, ","))
	for _, t := range ts {
		cw.Write([]string{t.ID.SN, t.ID.IMEI, t.ID.IMSI, "", "hs256", string(t.Up), string(t.Down), hex.EncodeToString(t.BK)})
	}
	cw.Flush()
	return cw.Error()
}

// readTerminals reads the CSV of writeTerminals (the header must be exactly
// csvHeader).
func readTerminals(r io.Reader) ([]*Terminal, error) {
	cr := csv.NewReader(r)
	rows, err := cr.ReadAll()
	if err != nil {
		return nil, err
	}
	if len(rows) == 0 || strings.Join(rows[0], ",") != csvHeader {
		return nil, fmt.Errorf("terminals CSV: header must be %q", csvHeader)
	}
	var ts []*Terminal
	for i, row := range rows[1:] {
		bk, err := hex.DecodeString(row[7])
		if err != nil || len(bk) != codec.BasicKeySize {
			return nil, fmt.Errorf("terminals CSV line %d: bad bk", i+2)
		}
		t := &Terminal{ID: codec.Identity{SN: row[0], IMEI: row[1], IMSI: row[2]}, Up: []byte(row[5]), Down: []byte(row[6]), BK: bk}
		if err := t.ID.Validate(); err != nil {
			return nil, fmt.Errorf("terminals CSV line %d: %v", i+2, err)
		}
		ts = append(ts, t)
	}
	return ts, nil
}
