//go:build tools

// Package tools pins the HashiCorp Vault server that the test suite runs
// as a real `vault server -dev`. It is a separate module so that the Vault
// server's dependency tree never enters the product's go.mod.
package tools

import _ "github.com/hashicorp/vault"
