package admin

import (
	"context"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/m2mguard/m2mguard/adminapi"
)

// Operator is a named admin token: the name the audit log and the
// security events give for what it does, its role, and the SHA-256 of the
// token (the token itself is stored nowhere).
type Operator struct {
	Name string
	Role string // adminapi.RoleFull or adminapi.RoleRead
	Hash [32]byte
}

// AdminOperator is the name of the operator of Options.Token (the
// broker's admin.token): a full operator.
const AdminOperator = "admin"

// maxOperatorsFile bounds the operators file; maxOperators the number of
// operators (each request compares its token with all of them).
const (
	maxOperatorsFile = 1 << 20
	maxOperators     = 1000
)

// ParseOperators reads an operators file (the broker's admin.tokens_file):
// one operator a line,
//
//	<name> <role> sha256:<64 hex digits>
//
// name is 1 to 64 of [A-Za-z0-9._-] (the audit log's name for it; "admin"
// is the admin token's and refused), role is full or read, and the hash is the
// SHA-256 of the operator's token, which is a random secret of at least
// 128 bits (m2mctl token new makes one and prints its line,
// adminapi.OperatorLine). Blank lines
// and lines starting with # are skipped. Names and hashes are unique.
// Errors name the line, never a hash.
func ParseOperators(r io.Reader) ([]Operator, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxOperatorsFile+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxOperatorsFile {
		return nil, fmt.Errorf("larger than %d bytes", maxOperatorsFile)
	}
	var ops []Operator
	names, hashes := map[string]int{}, map[[32]byte]int{}
	for i, text := range strings.Split(string(data), "\n") {
		line := i + 1
		text = strings.TrimSpace(text)
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		op, err := parseOperator(text)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		if first, dup := names[op.Name]; dup {
			return nil, fmt.Errorf("line %d: operator %s is already on line %d", line, op.Name, first)
		}
		if first, dup := hashes[op.Hash]; dup {
			return nil, fmt.Errorf("line %d: the token of %s is already line %d's: each operator needs a token of its own", line, op.Name, first)
		}
		names[op.Name], hashes[op.Hash] = line, line
		if ops = append(ops, op); len(ops) > maxOperators {
			return nil, fmt.Errorf("more than %d operators", maxOperators)
		}
	}
	return ops, nil
}

func parseOperator(line string) (Operator, error) {
	f := strings.Fields(line)
	if len(f) != 3 {
		return Operator{}, errors.New("want <name> <role> sha256:<hex>")
	}
	op := Operator{Name: f[0], Role: f[1]}
	if err := validOperatorName(op.Name); err != nil {
		return Operator{}, err
	}
	if op.Name == AdminOperator {
		return Operator{}, fmt.Errorf("name %s is the admin token's (admin.token)", AdminOperator)
	}
	if op.Role != adminapi.RoleFull && op.Role != adminapi.RoleRead {
		return Operator{}, fmt.Errorf("role of %s: want full or read", op.Name)
	}
	digits, ok := strings.CutPrefix(f[2], "sha256:")
	if !ok || len(digits) != 64 || strings.ToLower(digits) != digits {
		return Operator{}, fmt.Errorf("token of %s: want sha256: and 64 lower-case hex digits (the token's SHA-256, never the token)", op.Name)
	}
	if _, err := hex.Decode(op.Hash[:], []byte(digits)); err != nil {
		return Operator{}, fmt.Errorf("token of %s: want sha256: and 64 lower-case hex digits", op.Name)
	}
	return op, nil
}

func validOperatorName(name string) error {
	ok := len(name) >= 1 && len(name) <= 64
	for i := 0; ok && i < len(name); i++ {
		c := name[i]
		ok = '0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || c == '.' || c == '_' || c == '-'
	}
	if !ok {
		return errors.New("name: want 1 to 64 of [A-Za-z0-9._-]")
	}
	return nil
}

// operators are the tokens of the API: the admin token and the named
// ones. who compares a token's hash with every one of them, in constant
// time and without stopping at a match, so that neither the answer's time
// nor its content tells which (or how many) there are.
type operators []Operator

func (ops operators) who(sum [32]byte) (Operator, bool) {
	var found Operator
	match := 0
	for i := range ops {
		eq := subtle.ConstantTimeCompare(sum[:], ops[i].Hash[:])
		if eq == 1 {
			found = ops[i]
		}
		match |= eq
	}
	return found, match == 1
}

// opKey is the context key of the operator of a request.
type opKey struct{}

func withOperator(ctx context.Context, op Operator) context.Context {
	return context.WithValue(ctx, opKey{}, op)
}

// operatorOf returns the operator who sent r (authenticated by require).
func operatorOf(ctx context.Context) Operator {
	op, _ := ctx.Value(opKey{}).(Operator)
	return op
}
