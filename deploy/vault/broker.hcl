# m2mguard broker: least privilege on the default layout
# (KV v2 mount "secret", prefix "m2mguard"; Transit mount "transit", key "m2mguard-session").
# Change the paths if you configure another mount or prefix.

# Terminal and application records: read, create, update. The broker writes every
# terminal with check-and-set; to make Vault refuse any write without it, set
# `vault kv metadata put -cas-required=true` per entry or cas_required on the mount.
path "secret/data/m2mguard/terminals/*" {
  capabilities = ["create", "read", "update"]
}
path "secret/data/m2mguard/apps/*" {
  capabilities = ["create", "read", "update"]
}
# Listing (admin API paging) and deleting (admin API delete) records.
path "secret/metadata/m2mguard/terminals/*" {
  capabilities = ["list", "read", "delete"]
}
path "secret/metadata/m2mguard/terminals" {
  capabilities = ["list"]
}
path "secret/metadata/m2mguard/apps/*" {
  capabilities = ["list", "read", "delete"]
}
path "secret/metadata/m2mguard/apps" {
  capabilities = ["list"]
}

# Campaigns of credential changes (m2mctl change campaign): the campaign, its
# list of serial numbers and one item per terminal handled. Read, create,
# update and list; never deleted by the broker.
path "secret/data/m2mguard/campaigns/*" {
  capabilities = ["create", "read", "update"]
}
path "secret/data/m2mguard/campaign-lists/*" {
  capabilities = ["create", "read", "update"]
}
path "secret/data/m2mguard/campaign-items/*" {
  capabilities = ["create", "read", "update"]
}
path "secret/metadata/m2mguard/campaigns/*" {
  capabilities = ["list", "read"]
}
path "secret/metadata/m2mguard/campaigns" {
  capabilities = ["list"]
}
path "secret/metadata/m2mguard/campaign-items/*" {
  capabilities = ["list", "read"]
}

# Optional: session keys from Transit, so every issue is in Vault's audit log.
path "transit/datakey/plaintext/m2mguard-session" {
  capabilities = ["update"]
}

# Keep its own token alive.
path "auth/token/renew-self" {
  capabilities = ["update"]
}
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
