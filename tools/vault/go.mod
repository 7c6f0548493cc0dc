module github.com/m2mguard/m2mguard/tools/vault

go 1.26

require (
	github.com/hashicorp/vault v1.21.1
	github.com/hashicorp/vault/api v1.23.0
	github.com/hashicorp/vault/sdk v0.20.0
)

replace github.com/99designs/keyring => github.com/Jeffail/keyring v1.2.3
