# m2mguard security team: read, correct and remove terminal records by hand with the
# vault CLI (see the README's "Vault layout"), read their history, manage the Transit key.

path "secret/data/m2mguard/*" {
  capabilities = ["create", "read", "update", "delete", "list"]
}
path "secret/metadata/m2mguard/*" {
  capabilities = ["read", "update", "delete", "list"]
}
path "secret/metadata/m2mguard" {
  capabilities = ["list"]
}
path "secret/undelete/m2mguard/*" {
  capabilities = ["update"]
}
path "secret/destroy/m2mguard/*" {
  capabilities = ["update"]
}
path "transit/keys/m2mguard-session" {
  capabilities = ["create", "read", "update"]
}
path "transit/keys/m2mguard-session/rotate" {
  capabilities = ["update"]
}
path "sys/policies/acl/m2mguard-*" {
  capabilities = ["read", "list"]
}
